"""The benchmark suite: scenarios x sizes x transformers lines -> JSON -> docs/benchmarks.md.

    python bench/suite.py run --python /path/venv-5.x/bin/python --python /path/venv-4.57/bin/python
    python bench/suite.py render           # docs/benchmarks.md and docs/benchmarks.png from bench/results/

Each (scenario, size, transformers line) is one ``run_bench`` (fresh process per trial,
ABBA order, medians) saved as bench/results/<transformers version>/<scenario>-<size>.json;
rendering reads whatever results exist, so a partial run still renders, and the page says
which cells were not run and why. Ceilings (memory, page cache, parallel disk read) are
measured once per checkpoint in the same run and stored with its results.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from fasthug_patch.bench import checkpoints, runner
from fasthug_patch.capabilities import PREQUANTISED_FROM, version_tuple


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    checkpoint_dtype: str
    cold: bool = False
    dtype: str = "default"  # the dtype argument of from_pretrained
    quant: str | None = None
    device: str = "cpu"
    checkpoint_size: str | None = None  # instead of the size being run (one size only)
    prequantized: str | None = None  # load a save_pretrained of the checkpoint quantised so ("8bit", "4bit")
    settings: tuple = ()  # (FASTHUG_* variable, value) pairs for the patched trials: a setting off by default
    cuda_first: bool = False  # GPU trials create their CUDA context before the timer


SCENARIOS = (
    Scenario("S1", "warm page cache, same dtype (bf16 checkpoint, dtype=bf16)", "bf16", dtype="bf16"),
    Scenario("S2", "cold page cache, same dtype (bf16 checkpoint, dtype=bf16)", "bf16", cold=True, dtype="bf16"),
    Scenario("S3", "fp32 checkpoint loaded as bf16, warm", "fp32", dtype="bf16"),
    Scenario("S3c", "fp32 checkpoint loaded as bf16, cold", "fp32", cold=True, dtype="bf16"),
    Scenario("S3d", "S3c with FASTHUG_IO=direct (O_DIRECT reads: less CPU, the file is not cached afterwards)", "fp32",
             cold=True, dtype="bf16", settings=(("FASTHUG_IO", "direct"),)),
    Scenario("D4", "4.x's default: bf16 checkpoint, no dtype argument (fp32 model), warm", "bf16"),
    Scenario("F1", "tied-embedding 1b (the layout fasthug 0.0.6 loads), no dtype argument, warm", "bf16",
             checkpoint_size="1b-tied"),
    Scenario("S4-int8", "bitsandbytes int8 on the fly (bf16 checkpoint, CPU)", "bf16", quant="8bit"),
    Scenario("S4-nf4", "bitsandbytes nf4 on the fly (bf16 checkpoint, CPU)", "bf16", quant="4bit"),
    Scenario("S5-int8", "pre-quantised int8 checkpoint (save_pretrained of S4-int8's model), CPU", "bf16",
             prequantized="8bit"),
    Scenario("S5-nf4", "pre-quantised nf4 checkpoint (save_pretrained of S4-nf4's model), CPU", "bf16",
             prequantized="4bit"),
    Scenario("S4g-int8", "bitsandbytes int8 on the fly, GPU", "bf16", quant="8bit", device="cuda"),
    Scenario("S4g-nf4", "bitsandbytes nf4 on the fly, GPU", "bf16", quant="4bit", device="cuda"),
    Scenario("S5g-int8", "pre-quantised int8 checkpoint, GPU", "bf16", prequantized="8bit", device="cuda"),
    Scenario("S5g-nf4", "pre-quantised nf4 checkpoint, GPU", "bf16", prequantized="4bit", device="cuda"),
    Scenario("S6", 'device_map="cuda", warm page cache', "bf16", dtype="bf16", device="cuda"),
    Scenario("S6w", 'S6 with the CUDA context created before the timer (a process that has used the GPU already)',
             "bf16", dtype="bf16", device="cuda", cuda_first=True),
    Scenario("S6c", 'device_map="cuda", cold page cache', "bf16", cold=True, dtype="bf16", device="cuda"),
    Scenario("S6m", "model.to(\"cuda\") after a CPU load, warm", "bf16", dtype="bf16", device="cpu+cuda"),
)
SIZES = ("125m", "1b", "3b", "7b")
RESULTS_DIR = os.path.join("bench", "results")
DOC = os.path.join("docs", "benchmarks.md")
RANKS_DIR = "ranks"  # bench/results/ranks/: bench/ranks.py's results
PLOT = os.path.join("docs", "benchmarks.png")


def python_info(python: str) -> dict:
    """transformers version of ``python``, and whether it has CUDA and fasthug 0.0.6."""
    code = ("import json, importlib.util, transformers, torch; print(json.dumps({'transformers': "
            "transformers.__version__, 'cuda': torch.cuda.is_available(), "
            "'fasthug': importlib.util.find_spec('fasthug') is not None, "
            "'bitsandbytes': importlib.util.find_spec('bitsandbytes') is not None}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def skip_reason(scenario: Scenario, info: dict, size: str) -> str | None:
    if "cuda" in scenario.device and not info["cuda"]:
        return "needs a CUDA GPU; none on this machine"
    if (scenario.quant or scenario.prequantized) and not info.get("bitsandbytes"):
        return "needs bitsandbytes, not installed for this interpreter"
    if scenario.quant and version_tuple(info["transformers"]) < PREQUANTISED_FROM:
        return "the fast path quantises on the fly from 4.57: both columns would be stock"
    if (scenario.quant or scenario.prequantized) and size != "1b":
        return "quantised scenarios run at 1b"
    if scenario.key in ("D4", "F1") and not info["transformers"].startswith("4."):
        return "5.x has no fp32 default" if scenario.key == "D4" else "fasthug 0.0.6 runs beside 4.57 only"
    if scenario.settings and size != "1b":
        return "scenarios of a setting run at 1b"
    if scenario.checkpoint_size and size != "1b":
        return f"run once, at 1b, on the {scenario.checkpoint_size} checkpoint"
    if scenario.checkpoint_dtype == "fp32" and size == "3b":
        return "a 12 GB fp32 checkpoint plus stock's peak would not fit beside the others in 24 GiB"
    return None


def result_path(root: str, transformers_version: str, scenario: Scenario, size: str) -> str:
    return os.path.join(root, RESULTS_DIR, transformers_version, f"{scenario.key}-{size}.json")


def run(pythons, sizes, scenario_keys, n: int, warmup: int, root: str) -> None:
    for python in pythons:
        info = python_info(python)
        for size in sizes:
            ceilings_done: dict[str, dict] = {}
            by_key = {s.key: s for s in SCENARIOS}
            for scenario in [by_key[k] for k in scenario_keys if k in by_key] if scenario_keys else SCENARIOS:
                out = result_path(root, info["transformers"], scenario, size)
                reason = skip_reason(scenario, info, size)
                if reason:
                    _save(out, {"skipped": reason, "scenario": scenario.key, "size": size})
                    continue
                built = scenario.checkpoint_size or size
                path = checkpoints.cached_checkpoint("llama", built, scenario.checkpoint_dtype,
                                                     shard_size=checkpoints.DEFAULT_SHARD.get(built))
                if scenario.prequantized:
                    path = checkpoints.quantized_checkpoint(path, scenario.prequantized, python=python)
                modes = ("stock", "patched")
                if info["fasthug"] and info["transformers"].startswith("4.") and scenario.dtype == "default":
                    modes += ("fasthug",)  # 0.0.6 takes no dtype argument
                print(f"== transformers {info['transformers']} {scenario.key} {size}: {scenario.title}", flush=True)
                fasthug_error = None
                if "fasthug" in modes:
                    try:  # one trial first: 0.0.6 fails on some checkpoints; then it sits out
                        runner.run_trial(path, "fasthug", python=python)
                    except runner.TrialError as exc:
                        fasthug_error = str(exc).strip().splitlines()[-1]
                        modes = ("stock", "patched")
                result = runner.run_bench(path, modes=modes, n=n, warmup=warmup, cold=scenario.cold,
                                          dtype=scenario.dtype, python=python, device=scenario.device,
                                          quant=scenario.quant, ceilings=False, settings=dict(scenario.settings),
                                          cuda_first=scenario.cuda_first)
                result["fasthug_error"] = fasthug_error
                if path not in ceilings_done:
                    ceilings_done[path] = runner.run_ceilings(path, python=python)
                result["ceilings"] = ceilings_done[path]
                runner.add_cast_floor(result, python)
                result.update(scenario=scenario.key, size=size, title=scenario.title)
                _save(out, result)
                print(runner.format_table(result), flush=True)


def _save(filename: str, data: dict) -> None:
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    with open(filename, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)


def load_results(root: str) -> list[dict]:
    found = []
    for name in sorted(glob.glob(os.path.join(root, RESULTS_DIR, "*", "*.json"))):
        if os.path.basename(os.path.dirname(name)) == RANKS_DIR:  # bench/ranks.py's, rendered apart
            continue
        with open(name) as f:
            data = json.load(f)
        data["_version_dir"] = os.path.basename(os.path.dirname(name))
        found.append(data)
    return found


def ceiling_fraction(result: dict) -> float | None:
    """Time to ready at the ceiling / patched time to ready: cold runs against the parallel
    disk read ceiling over the checkpoint's bytes; warm casts (runner.is_warm_cast) against
    a new process's first write of the loaded weights' bytes, since every byte of a cast
    result is written into fresh memory; other warm runs against memory copy bandwidth over
    the checkpoint's bytes."""
    c = result.get("ceilings") or {}
    patched = _stat(result, "patched", "ready_s")
    nbytes = result.get("checkpoint_bytes")
    key = "cold_read_gbps" if result.get("cold") else "memcpy_gbps"
    if "cuda" in str(result.get("device")) and not result.get("cold"):
        key = "h2d_pinned_gbps"
    elif runner.is_warm_cast(result):
        if c.get("bare_cast_s") and patched:  # the cast itself, measured bare: the closer floor
            return c["bare_cast_s"] / patched
        key, nbytes = "fresh_write_gbps", result.get("weight_bytes")
    if not (c.get(key) and patched and nbytes):
        return None
    return nbytes / 1e9 / c[key] / patched


def cast_floor_lines(rows: list[dict]) -> list[str]:
    """One line per warm cast row with a measured floor: the floor, and the most any loader
    could gain over stock there (stock's time to ready over the floor). Where the same
    version has an S1 row of the same size (a zero-copy load of that model), the faster
    side's from_pretrained median there is added: building the model and the rest of
    from_pretrained's own work, which a cast load pays as well."""
    out = []
    for r in rows:
        gbps = (r.get("ceilings") or {}).get("fresh_write_gbps")
        stock = _stat(r, "stock", "ready_s")
        patched = _stat(r, "patched", "ready_s")
        if r.get("skipped") or not runner.is_warm_cast(r) or not (gbps and stock and patched):
            continue
        floor = r["weight_bytes"] / 1e9 / gbps
        line = f"- {r['scenario']} {r['size']}: {r['weight_bytes'] / 1e9:.2f} GB at {gbps:.2f} GB/s = {floor:.2f} s"
        building = _model_building_s(rows, r["size"])
        if building:
            floor += building
            line += f", plus {building:.2f} s building the model (S1's from_pretrained) = {floor:.2f} s"
        out.append(f"{line}; stock {stock:.2f} s, patched {patched:.2f} s; at most {stock / floor:.2f}x "
                   "over stock is possible")
        bare = r["ceilings"].get("bare_cast_s")
        if bare:
            floor = bare + (building or 0.0)
            line = (f"- {r['scenario']} {r['size']}, the cast itself: a new process casting the files' tensors to "
                    f"{r['ceilings'].get('bare_cast_dtype')} into fresh memory on {r['ceilings'].get('bare_cast_threads')} "
                    f"threads, no model, {bare:.2f} s")
            if building:
                line += f", plus {building:.2f} s building the model = {floor:.2f} s"
            out.append(f"{line}; at most {stock / floor:.2f}x over stock is possible, patched is at "
                       f"{floor / patched:.0%} of it")
    return out


def _stat(result: dict, mode: str, key: str) -> float | None:
    return (((result.get("stats") or {}).get(mode) or {}).get(key) or {}).get("median")


def _model_building_s(rows: list[dict], size: str) -> float | None:
    """The faster side's from_pretrained median of this version's S1 row of ``size``."""
    s1 = next((r for r in rows if r.get("scenario") == "S1" and r.get("size") == size and not r.get("skipped")), None)
    times = [t for t in (_stat(s1, m, "from_pretrained_s") for m in ("stock", "patched")) if t] if s1 else []
    return min(times) if times else None


def _cell(stats: dict, mode: str, key: str, scale: float = 1.0) -> str:
    s = (stats.get(mode) or {}).get(key)
    return "–" if not s else f"{s['median'] * scale:.2f} ({s['min'] * scale:.2f}–{s['max'] * scale:.2f})"


def _median(stats: dict, mode: str, key: str, scale: float = 1.0) -> str:
    s = (stats.get(mode) or {}).get(key)
    return "–" if not s else f"{s['median'] * scale:.2f}"


def _same_model(result: dict) -> str:
    """'yes' when every stock and patched trial had one weight digest (and, where a forward
    pass ran, one logits digest)."""
    if not result.get("identical"):
        return "NO"
    return "yes, but the logits differ" if result.get("forward_identical") is False else "yes"


def _portable(command: str) -> str:
    """The rerun command as run from a checkout's root (the suite may have run from a copy)."""
    if command.startswith("PYTHONPATH="):
        command = "PYTHONPATH=. " + command.split(" ", 1)[1]
    return re.sub(r"\S*/(\.matrix/\S+)", r"\1", command)  # scripts/matrix.py's environments


def describe_machine(machine: dict) -> str:
    """The parts of a result's machine record that make its numbers comparable with another's."""
    return (f"{machine.get('cpu')}, {machine.get('cores')} cores, {(machine.get('ram_bytes') or 0) / 2**30:.0f} GiB "
            f"RAM, Linux {machine.get('kernel')}, torch {machine.get('torch')}")


def machine_labels(results: list[dict]) -> dict[str, str]:
    """Each distinct machine among the measured results -> a short label (A, B, ...), in the
    order first met: rows from different machines must not read as one run."""
    labels: dict[str, str] = {}
    for r in results:
        if r.get("machine") and not r.get("skipped"):
            labels.setdefault(describe_machine(r["machine"]), chr(ord("A") + len(labels)))
    return labels


def _machine_of(result: dict) -> str:
    return describe_machine(result["machine"]) if result.get("machine") else "an unrecorded machine"


def _measured(results: list[dict]) -> str:
    days = sorted(r["started"] for r in results if r.get("started") and not r.get("skipped"))
    return days[0] if len(days) < 2 else f"{days[0]} to {days[-1]}"


def render(root: str) -> str:
    results = load_results(root)
    lines = ["# Benchmarks", "",
             "Generated by `python bench/suite.py render` from the JSON in bench/results/ (written by "
             "`python bench/suite.py run`); do not edit by hand.", "",
             "Every number is a median over fresh processes, stock and patched alternating (ABBA), after a "
             "warm-up round; min–max in brackets. **Time to ready** is `from_pretrained` plus every weight "
             "page resident (one byte read in every 4 KiB page), with the modeling module imported "
             "beforehand. Cold runs evict the checkpoint's pages with `posix_fadvise(POSIX_FADV_DONTNEED)` "
             "before every trial. *Same model* means every stock and patched trial gave the same digest "
             "(sha256, or xxh3-128 where xxhash is installed) over all weights' names, dtypes, shapes and bytes, and the same tied groups, and the first "
             "forward pass (16 fixed tokens, timed after the load) the same logits. *Patched GB/s* is the "
             "checkpoint's bytes over patched time to ready.", "",
             "The checkpoints are Llama-architecture models with seeded random weights built locally "
             "(`fasthug_patch.bench.checkpoints`): 125m (~0.2B with its 32k vocabulary), 1b (TinyLlama-1.1B "
             "shape), 3b (Llama-3.2-3B body, sharded in 2 GB files).", "",
             "![time to ready against checkpoint size, stock vs patched](benchmarks.png)", ""]
    by_version: dict[str, list[dict]] = {}
    for r in results:
        by_version.setdefault(r["_version_dir"], []).append(r)
    machines = machine_labels(results)
    if len(machines) == 1:
        lines += [f"Machine: {next(iter(machines))}; no GPU. Measured {_measured(results)}.", ""]
    elif machines:
        lines += ["Measured on more than one machine (each row names its own; compare rows of one machine "
                  f"only): {'; '.join(f'[{label}] {desc}' for desc, label in machines.items())}; no GPU. "
                  f"Measured {_measured(results)}.", ""]
    order = {s.key: i for i, s in enumerate(SCENARIOS)}
    for version in sorted(by_version, reverse=True):
        rows = sorted(by_version[version], key=lambda r: (order.get(r.get("scenario"), 99), SIZES.index(r["size"])
                                                          if r.get("size") in SIZES else 9))
        lines += [f"## transformers {version}", "",
                  "| scenario | size | GB | stock ready s | patched ready s | stock/patched | patched GB/s "
                  "| fasthug 0.0.6 ready s | peak RSS stock / patched GB | first forward stock / patched s "
                  "| of ceiling | same model |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        skipped = []
        for r in rows:
            if r.get("skipped"):
                skipped.append(f"- {r['scenario']} {r['size']}: not run ({r['skipped']})")
                continue
            stats, ratio = r["stats"], r.get("ratio") or {}
            frac = ceiling_fraction(r)
            fh = "–"
            if r.get("fasthug_error"):
                fh = f"fails: `{r['fasthug_error'][:80]}`"
            if "fasthug" in r["modes"]:
                fh = _cell(stats, "fasthug", "ready_s")
                if not (r.get("matches_stock") or {}).get("fasthug", False):
                    fh += " (not the stock model)"
            speedup = "–" if ratio.get("ready_s") is None else f"{ratio['ready_s']:.2f}x"
            rss = f"{_median(stats, 'stock', 'peak_rss_bytes', 1e-9)} / {_median(stats, 'patched', 'peak_rss_bytes', 1e-9)}"
            forward = f"{_median(stats, 'stock', 'forward_s')} / {_median(stats, 'patched', 'forward_s')}"
            tag = f" [{machines[describe_machine(r['machine'])]}]" if len(machines) > 1 else ""
            lines.append(
                f"| {r['scenario']} {r.get('title', '')}{tag} | {r['size']} | {(r.get('checkpoint_bytes') or 0) / 1e9:.2f} "
                f"| {_cell(stats, 'stock', 'ready_s')} | {_cell(stats, 'patched', 'ready_s')} "
                f"| {speedup} | {_median(stats, 'patched', 'ready_gbps')} | {fh} | {rss} | {forward} "
                f"| {'–' if frac is None else f'{frac:.0%}'} | {_same_model(r)} |")
        lines.append("")
        lines += skipped
        if skipped:
            lines.append("")
        floors = cast_floor_lines(rows)
        if floors:
            lines += ["Floors of the warm casts, measured in the row's run: the loaded weights' bytes at the "
                      "first-write rate of a new process, and, where measured, the bare cast (a new process "
                      "casting the files' tensors into fresh memory, best of 3); each plus the time this version "
                      "takes to build the model, where its S1 row was run:", ""] + floors + [""]
        ceil = next((r for r in rows if r.get("ceilings") and r.get("size") == "1b" and not r.get("skipped")), None)
        if ceil:
            lines += ["Ceilings on the 1b checkpoint, same run: "
                      + runner.format_ceilings(ceil["ceilings"], ceil.get("weight_bytes"), ceil.get("checkpoint_bytes")), ""]
        cmds = sorted({_portable(r["command"]) for r in rows if r.get("command")})
        if cmds:
            lines += ["<details><summary>Commands to rerun one cell (from the repository root; the "
                      "checkpoints are built under ~/.cache/fasthug_patch by the suite)</summary>", ""]
            lines += [f"    {c}" for c in cmds] + ["", "</details>", ""]
    lines += render_ranks(root)
    lines += ["## Reading the numbers", "",
              "- *of ceiling*: the time the machine's ceiling needs for the checkpoint's bytes (cold: the best "
              "parallel `preadv` read of the files; warm: a memory copy of that many bytes) divided by "
              "patched time to ready, so 100% means the load ran at the ceiling. Time to ready includes "
              "building the model, which the ceiling does not.",
              "- For warm casts (S3, D4) the ceiling is a new process writing the loaded weights' bytes into "
              "memory it just allocated (best of 3 processes): a cast writes every byte of its result into "
              "fresh memory, so no loader, stock or patched, can be ready sooner. Stock's time over that "
              "floor (plus building the model, where the S1 row was run) is the most any loader could gain "
              "over stock there. Where the bare cast was measured (the same cast, chunked and on one thread "
              "per core, with no model and no loader), *of ceiling* is that time over patched time to ready: "
              "a cast also reads every source byte and converts it, which the first-write floor leaves out.",
              "- Peak RSS counts mapped checkpoint pages; a zero-copy load holds the checkpoint's bytes, a cast "
              "load should hold only the result's.",
              "- GPU scenarios (S4g-*, S6*) need a CUDA machine; what was measured on a lent H100 so far, by "
              "hand-run commands, is in [gpu.md](gpu.md).",
              "- Quantised scenarios (S4-*, S5-*) import bitsandbytes before the timer on both sides (0.5-0.8 s "
              "here, mostly its torch.compile wrappers importing inductor), as every trial does with torch, "
              "transformers and the modeling module. On 4.57 a pre-quantised checkpoint is placed by the "
              "quantizer's own create_quantized_param, as in stock's loop; most of the int8 lead is its "
              "per-tensor bitsandbytes version check (a package-metadata read), asked once per load by the "
              "fast path and once per tensor by stock. The rest: the fast path keeps Python's garbage "
              "collector off during the load (stock's collections in a 4.57 nf4 trial took 0.2 s, one of "
              "them full, over the objects the imports made) and walks to each tensor's module once per "
              "shard where stock's helpers walk three or four times.",
              "- fasthug 0.0.6 loads the checkpoint's own dtype whatever transformers' default; in the default "
              "(no dtype) scenario on 4.57 that is bf16 where stock gives fp32, so its model is not stock's.",
              ""]
    return "\n".join(lines)


def render_ranks(root: str) -> list[str]:
    """The section for bench/ranks.py's results (ranks of one job sharing the reading)."""
    results = []
    for name in sorted(glob.glob(os.path.join(root, RESULTS_DIR, RANKS_DIR, "*.json"))):
        with open(name) as handle:
            results.append(json.load(handle))
    if not results:
        return []
    lines = ["## Ranks of one job sharing the reading (cold cache)", "",
             "N ranks under `torchrun --standalone` (no process group yet, as a training job before "
             "`init_process_group`) against one patched process, alternating, the checkpoint evicted before "
             "every round. *Slowest rank* is the largest time to ready among the ranks of a round. *Read from "
             "storage* is /proc/self/io `read_bytes` summed over the round's processes: what came off the disk.",
             "", "| transformers | size | GB | ranks | one process ready s | slowest rank ready s | "
             "one process / slowest rank | read from storage: one process / all ranks GB | same model |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        single, ranks = r["single_ready_s"], r["ranks_slowest_ready_s"]
        lines.append(
            f"| {r['transformers']} | {r['size']} | {r['checkpoint_bytes'] / 1e9:.2f} | {r['world']} "
            f"| {single['median']:.2f} ({single['min']:.2f}–{single['max']:.2f}) "
            f"| {ranks['median']:.2f} ({ranks['min']:.2f}–{ranks['max']:.2f}) | {r['ratio']:.2f}x "
            f"| {statistics.median(r['single_storage_read_bytes']) / 1e9:.2f} / "
            f"{statistics.median(r['ranks_storage_read_bytes']) / 1e9:.2f} | {'yes' if r['identical'] else 'NO'} |")
    lines += [""] + [f"Rerun: `{r['command']}` (n={r['n']}, {r['warmup']} warm-up round per side; "
                     f"how the ranks split it: {r['sharing']}; measured on {_machine_of(r)})." for r in results] + [""]
    return lines


PLOTTED = ("S1", "S2", "S3", "S3c", "D4")


def _minor_label(value: float, _position=None) -> str:
    """Label the 2x and 5x minor ticks of a log axis only, so decades spanning a wide range
    do not run their labels into each other."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if leading in (2, 5) else ""


def plot(root: str, filename: str) -> None:
    """Time to ready against checkpoint size, stock (dashed) vs patched (solid), one panel
    per transformers line, one colour per scenario; whiskers are min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in load_results(root) if not r.get("skipped") and r.get("scenario") in PLOTTED
               and r.get("size") in SIZES]
    versions = sorted({r["_version_dir"] for r in results}, reverse=True)
    if not versions:
        return
    cols = min(2, len(versions))  # two panels a row, so the page shows them at a readable size
    grid_rows = (len(versions) + cols - 1) // cols
    fig, axes = plt.subplots(grid_rows, cols, figsize=(6.5 * cols, 4.6 * grid_rows), squeeze=False)
    for spare in axes.flat[len(versions):]:
        spare.set_visible(False)
    colours = dict(zip(PLOTTED, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")))
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax, version in zip(axes.flat, versions):
        sizes_seen: set[float] = set()
        for key in PLOTTED:
            rows = sorted((r for r in results if r["_version_dir"] == version and r["scenario"] == key),
                          key=lambda r: r.get("checkpoint_bytes") or 0)
            if not rows:
                continue
            xs = [(r.get("checkpoint_bytes") or 0) / 1e9 for r in rows]
            sizes_seen.update(xs)
            for mode, style in (("stock", "--"), ("patched", "-")):
                cells = [((r["stats"].get(mode) or {}).get("ready_s") or {}) for r in rows]
                if not all(c.get("median") for c in cells):
                    continue
                med = [c["median"] for c in cells]
                err = [[m - c["min"] for m, c in zip(med, cells)], [c["max"] - m for m, c in zip(med, cells)]]
                ax.errorbar(xs, med, yerr=err, fmt="o" + style, color=colours[key], capsize=3,
                            label=f"{key} {mode}", alpha=1.0 if mode == "patched" else 0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.3, not 3x10^-1
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_xticks(sorted(sizes_seen), [f"{x:.2g}" for x in sorted(sizes_seen)])
        ax.set_xlabel("checkpoint size (GB)")
        ax.set_ylabel("time to ready (s): median, min-max")
        ax.set_title(f"transformers {version}: stock (dashed) vs patched (solid)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(filename, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/suite.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the scenarios, then render")
    r.add_argument("--python", action="append", help="interpreter of one transformers line (repeatable)")
    r.add_argument("--sizes", default=",".join(SIZES))
    r.add_argument("--scenarios", default="", help="comma-separated keys, run in that order (default: all)")
    r.add_argument("-n", type=int, default=3)
    r.add_argument("--warmup", type=int, default=1)
    r.add_argument("--root", default=".")
    d = sub.add_parser("render", help="write docs/benchmarks.md and docs/benchmarks.png from bench/results")
    d.add_argument("--root", default=".")
    args = p.parse_args(argv)
    if args.command == "run":
        began = time.time()
        run(args.python or [sys.executable], [s for s in args.sizes.split(",") if s],
            [s for s in args.scenarios.split(",") if s], args.n, args.warmup, args.root)
        print(f"suite: {time.time() - began:.0f}s")
    os.makedirs(os.path.join(args.root, "docs"), exist_ok=True)
    with open(os.path.join(args.root, DOC), "w") as f:
        f.write(render(args.root))
    try:
        plot(args.root, os.path.join(args.root, PLOT))
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
