"""Run benchmark trials (each in a fresh process), alternate modes, summarise.

Memory behaviour on small VMs is noisy (fresh anonymous memory can fault in at very
different speeds from one run to the next), so trials alternate between modes in ABBA
order -- round 0 stock, patched; round 1 patched, stock; ... -- and the statistics are
medians (with min and max beside them).

Nothing heavy is imported here; torch and transformers live in the trial processes.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

from fasthug_patch.bench import checkpoints
from fasthug_patch.engine.residency import file_residency

TRIAL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trial.py")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (key in the trial JSON, label, unit scale, unit); lower is better except for HIGHER_IS_BETTER.
METRICS = (
    ("from_pretrained_s", "from_pretrained", 1.0, "s"),
    ("ready_s", "time to ready", 1.0, "s"),
    ("ready_gbps", "checkpoint GB/s to ready", 1.0, "GB/s"),
    ("forward_s", "first forward pass", 1.0, "s"),
    ("peak_rss_bytes", "peak RSS", 1e-9, "GB"),
    ("rss_after_bytes", "RSS when ready", 1e-9, "GB"),
)
# Rates: their ratio is taken the other way round (patched/stock), so that for every metric
# a ratio above 1 means patched did better.
HIGHER_IS_BETTER = frozenset({"ready_gbps"})


# --------------------------------------------------------------------------- page cache


def evict(path) -> int:
    """Drop the page-cache pages of every file of ``path`` (a file or a checkpoint folder)
    with posix_fadvise(POSIX_FADV_DONTNEED). Returns the bytes covered.

    Dirty pages cannot be dropped, so each file is fdatasync'ed first (instant when
    nothing is dirty, e.g. not for a checkpoint written seconds ago)."""
    total = 0
    for name in checkpoints.weight_files(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def residency(path) -> float:
    """Fraction (0..1) of the pages of ``path``'s files that are in the page cache."""
    resident = pages = 0
    for name in checkpoints.weight_files(path):
        r, p = file_residency(name)
        resident += r
        pages += p
    return resident / pages if pages else 0.0


# --------------------------------------------------------------------------- statistics


def summarize(values) -> dict | None:
    """{median, min, max, n} of the numbers in ``values`` (None entries ignored)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(numerator, denominator) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def schedule(modes=("stock", "patched"), n: int = 5, warmup: int = 1) -> list[dict]:
    """The trial order: ``warmup`` rounds then ``n`` measured rounds, each round running
    every mode once; even rounds in the given order, odd rounds reversed (ABBA)."""
    modes = tuple(modes)
    plan = []
    for phase, rounds in (("warmup", warmup), ("measure", n)):
        for r in range(rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            plan.extend({"phase": phase, "round": r, "mode": m} for m in order)
    return plan


def compute_stats(trials: list[dict], modes) -> dict:
    """Per mode and metric: summarize() over the measured (non-warmup) trials."""
    stats = {}
    for mode in modes:
        rows = [t for t in trials if t["mode"] == mode and t.get("phase", "measure") == "measure"]
        stats[mode] = {key: summarize(t.get(key) for t in rows) for key, *_ in METRICS}
    return stats


def compute_ratios(stats: dict, modes) -> dict:
    """modes[0] median / modes[1] median per metric (stock/patched: > 1 means patched
    is faster, or smaller for memory); the inverse for rates (HIGHER_IS_BETTER), so > 1
    means patched did better whatever the metric."""
    if len(modes) < 2:
        return {}
    a, b = stats[modes[0]], stats[modes[1]]
    ratios = {}
    for key, *_ in METRICS:
        first, second = (a.get(key) or {}).get("median"), (b.get(key) or {}).get("median")
        ratios[key] = ratio(second, first) if key in HIGHER_IS_BETTER else ratio(first, second)
    return ratios


def ready_gbps(checkpoint_bytes: int | None, ready_s: float | None) -> float | None:
    """The checkpoint's bytes over the time to ready, in GB/s: the rate the whole load ran at."""
    if not checkpoint_bytes or not ready_s:
        return None
    return checkpoint_bytes / 1e9 / ready_s


# Modes that promise the stock model. Others (fasthug 0.0.6) are compared, not required to match.
EXACT_MODES = ("stock", "patched")


def check_identical(trials: list[dict]) -> dict:
    """Every stock and patched trial (warmup included) must give the same weight digest and
    the same tying structure. Other modes are reported in ``matches_stock``."""
    exact = [t for t in trials if t.get("mode", "stock") in EXACT_MODES]
    digests = sorted({t.get("digest") for t in exact})
    ties = sorted({t.get("tie_digest") for t in exact})
    forwards = sorted({t.get("forward_digest") for t in exact if t.get("forward_digest")})
    identical = bool(exact) and len(digests) == 1 and None not in digests and len(ties) == 1
    others = sorted({t["mode"] for t in trials if t.get("mode", "stock") not in EXACT_MODES})
    matches = {mode: all(t.get("digest") in digests and len(digests) == 1 for t in trials if t.get("mode") == mode)
               for mode in others}
    return {"identical": identical, "digests": digests, "tie_digests": ties,
            "forward_identical": None if not forwards else len(forwards) == 1, "matches_stock": matches}


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram, "kernel": platform.release(),
            "system": platform.system()}


# --------------------------------------------------------------------------- trials


def trial_env(mode: str, settings: dict | None = None) -> dict:
    """The environment of a trial process: FASTHUG_ENABLE removed (stock must not import
    the plugin at all; patched imports and enables it itself), and this checkout first on
    PYTHONPATH so patched trials import the same fasthug_patch as this process. ``settings``
    (FASTHUG_* variables) are set for patched trials only."""
    env = {k: v for k, v in os.environ.items() if k != "FASTHUG_ENABLE"}
    if mode == "patched":
        paths = [PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACKAGE_ROOT]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.update(settings or {})
    return env


def trial_command(python: str, path: str, mode: str, dtype: str = "default", device: str = "cpu",
                  forward: bool = False, quant: str | None = None, cuda_first: bool = False,
                  inference_mode: bool = False) -> list[str]:
    cmd = [python, TRIAL_SCRIPT, "--mode", mode, "--path", str(path), "--dtype", dtype, "--device", device]
    if forward:
        cmd.append("--forward")
    if cuda_first:
        cmd.append("--cuda-first")
    if inference_mode:
        cmd.append("--inference-mode")
    if quant:
        cmd += ["--quant", quant]
    return cmd


class TrialError(RuntimeError):
    pass


def run_trial(path, mode: str, dtype: str = "default", device: str = "cpu", forward: bool = False,
              quant: str | None = None, python: str = sys.executable, timeout: float | None = None,
              settings: dict | None = None, cuda_first: bool = False, inference_mode: bool = False) -> dict:
    """One trial in a fresh process; returns its parsed JSON line."""
    cmd = trial_command(python, path, mode, dtype, device, forward, quant, cuda_first, inference_mode)
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=trial_env(mode, settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - began
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise TrialError(f"{mode} trial failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    result = json.loads(lines[-1])
    result["process_wall_s"] = wall
    return result


def rerun_command(path, modes, n, warmup, cold, dtype, device, forward, python, quant=None,
                  ceilings=False, settings: dict | None = None, cuda_first: bool = False,
                  inference_mode: bool = False) -> str:
    parts = [python, "-m", "fasthug_patch.cli", "bench", str(path), "-n", str(n), "--warmup", str(warmup)]
    if dtype not in (None, "default"):
        parts += ["--dtype", dtype]
    if device != "cpu":
        parts += ["--device", device]
    if cuda_first:
        parts.append("--cuda-first")
    if inference_mode:
        parts.append("--inference-mode")
    if cold:
        parts.append("--cold")
    if not forward:
        parts.append("--no-forward")
    if quant:
        parts.append(f"--load-in-{quant}")
    if not ceilings:
        parts.append("--no-ceilings")
    if tuple(modes) != ("stock", "patched"):
        parts += ["--modes", ",".join(modes)]
    assignments = "".join(f"{name}={shlex.quote(value)} " for name, value in sorted((settings or {}).items()))
    return f"{assignments}PYTHONPATH={shlex.quote(PACKAGE_ROOT)} " + shlex.join(parts)


def run_bench(path, modes=("stock", "patched"), n: int = 5, warmup: int = 1, cold: bool = False,
              dtype: str = "default", python: str = sys.executable, progress: bool = True,
              device: str = "cpu", forward: bool = True, quant: str | None = None,
              ceilings: bool = False, timeout: float | None = None, settings: dict | None = None,
              cuda_first: bool = False, inference_mode: bool = False) -> dict:
    """Warmup rounds, then ``n`` ABBA rounds of ``modes``, each trial a fresh process.
    ``settings``: FASTHUG_* variables for the patched trials (a setting off by default).
    ``cuda_first``: GPU trials create their CUDA context before the timer (both modes).
    ``inference_mode``: every trial loads inside torch.inference_mode(), as serving code does.

    ``cold``: evict the checkpoint's pages from the page cache before every trial (the
    residency measured right after is recorded with the trial). ``ceilings``: also measure
    memory / page-cache / disk bandwidth (:mod:`fasthug_patch.bench.ceiling`) first.
    Returns a JSON-able dict; :func:`format_table` renders it.
    """
    modes = tuple(modes)
    local = checkpoints.resolve_local(path)
    if cold and local is None:
        raise ValueError(f"--cold needs the checkpoint's files on disk; {path!r} is not a local path "
                         "nor in the hub cache")
    started = time.time()
    checkpoint_bytes = checkpoints.weight_bytes(local) if local else None
    ceiling = None
    if ceilings:
        if local is None:
            ceiling = {"error": "no local files to measure"}
        else:
            ceiling = run_ceilings(local, python=python, timeout=timeout)
    plan = schedule(modes, n, warmup)
    bar = _progress(len(plan), progress)
    trials = []
    try:
        for i, step in enumerate(plan):
            if bar is not None:
                bar.set_description(f"{step['phase']} {step['round'] + 1} {step['mode']}")
            resident = None
            if cold:
                evict(local)
                resident = residency(local)
            elif local is not None:
                resident = residency(local)
            result = run_trial(path, step["mode"], dtype, device, forward, quant, python, timeout, settings,
                               cuda_first, inference_mode)
            result.update(step, index=i, resident_before=resident,
                          ready_gbps=ready_gbps(checkpoint_bytes, result.get("ready_s")))
            trials.append(result)
            if bar is not None:
                bar.set_postfix_str(f"ready {result['ready_s']:.2f}s")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    stats = compute_stats(trials, modes)
    same = check_identical(trials)
    first = trials[0] if trials else {}
    reports = [t["fasthug"] for t in trials if t.get("fasthug")]
    fast_summary = None
    if reports:
        paths: dict[str, int] = {}
        for rep in reports:
            paths[str(rep.get("path"))] = paths.get(str(rep.get("path")), 0) + 1
        fast_summary = {"paths": paths, "reasons": sorted({r.get("reason") or "" for r in reports}),
                        "threads": reports[-1].get("threads"), "last_summary": reports[-1].get("summary")}
    machine = machine_info()
    machine.update(first.get("versions", {}))
    result = {
        "path": str(path),
        "local_path": local,
        "modes": list(modes),
        "n": n,
        "warmup": warmup,
        "cold": cold,
        "dtype": dtype,
        "device": device,
        "cuda_first": cuda_first,
        "inference_mode": inference_mode,
        "forward": forward,
        "quant": quant,
        "prequantized": checkpoints.quantization_method(local) if local else None,
        "model_class": first.get("model_class"),
        "weight_bytes": first.get("weight_bytes"),
        "checkpoint_bytes": checkpoint_bytes,
        "loaded_dtypes": first.get("dtypes"),
        "stats": stats,
        "ratio": compute_ratios(stats, modes),
        **same,
        "fasthug": fast_summary,
        "ceilings": ceiling,
        "machine": machine,
        "python": python,
        "command": rerun_command(path, modes, n, warmup, cold, dtype, device, forward, python, quant, ceilings,
                                 settings, cuda_first, inference_mode),
        "settings": dict(settings or {}),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "seconds": time.time() - started,
        "trials": trials,
    }
    add_cast_floor(result, python)
    return result


# The checkpoint's bytes also count its header and the small files beside the weights, and
# a model holds buffers no checkpoint has (rotary inv_freq): a same-dtype load differs from
# its checkpoint by well under 1%. A dtype cast changes the size by a factor (fp32 <-> bf16: 2).
CAST_SIZE_CHANGE = 0.10


def is_warm_cast(result: dict) -> bool:
    """A warm CPU load whose result's size differs from its checkpoint's by more than
    CAST_SIZE_CHANGE: a dtype cast. Not a quantised load, on the fly or pre-quantised (most
    of its bytes are placed as read)."""
    weights, checkpoint = result.get("weight_bytes"), result.get("checkpoint_bytes")
    return (not result.get("cold") and not result.get("quant") and not result.get("prequantized")
            and "cuda" not in str(result.get("device")) and bool(weights) and bool(checkpoint)
            and abs(weights - checkpoint) > CAST_SIZE_CHANGE * checkpoint)


def add_cast_floor(result: dict, python: str = sys.executable) -> None:
    """For a warm cast with measured ceilings: add a new process's first-write rate at the
    size of the loaded weights (the per-checkpoint figure is measured at the checkpoint's
    size, and the rate depends on the size), and a bare cast of the checkpoint's files to
    the dtype most of the loaded bytes have (ceiling.bare_cast_seconds): the floor of any
    cast load, without building the model."""
    from fasthug_patch.bench import ceiling, checkpoints

    ceilings = result.get("ceilings")
    if not (ceilings and not ceilings.get("error") and is_warm_cast(result)):
        return
    ceilings = {**ceilings, **ceiling.fresh_write_gbps(int(result["weight_bytes"]), python=python)}
    dtypes = result.get("loaded_dtypes") or {}
    files = [f for f in checkpoints.weight_files(result["path"]) if f.endswith(".safetensors")] \
        if result.get("path") else []
    if dtypes and files:
        ceilings.update(ceiling.bare_cast_seconds(files, max(dtypes, key=dtypes.get), python=python))
    result["ceilings"] = ceilings


def run_ceilings(path, python: str = sys.executable, timeout: float | None = None) -> dict:
    """ceiling.measure_all(path) in a fresh process (its buffers do not stay around)."""
    cmd = [python, "-m", "fasthug_patch.bench.ceiling", "--path", str(path)]
    env = trial_env("patched")  # PYTHONPATH for this checkout; the plugin is not used there
    env["FASTHUG_ENABLE"] = "0"
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"ceiling run failed (exit {proc.returncode}): "
                         + " | ".join(proc.stderr.strip().splitlines()[-5:])}
    return json.loads(lines[-1])


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="trial", file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------- output


def _fmt(value, scale: float) -> str:
    if value is None:
        return "–"
    v = value * scale
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


def format_table(result: dict) -> str:
    """Markdown: one row per metric, median (min–max) per mode, and the ratio."""
    modes = result["modes"]
    stats = result["stats"]
    lines = []
    size = result.get("weight_bytes")
    gb = f"{size / 1e9:.2f} GB" if size else "? GB"
    m = result.get("machine", {})
    lines.append(f"**{result.get('model_class') or 'model'}** `{result['path']}` — {gb} of weights "
                 f"({_dtypes(result.get('loaded_dtypes'))}), dtype arg `{result['dtype']}`, "
                 f"device {result['device']}, {'COLD (page cache evicted before each trial)' if result['cold'] else 'warm page cache'}, "
                 f"{'inside torch.inference_mode(), ' if result.get('inference_mode') else ''}"
                 f"n={result['n']} (+{result['warmup']} warmup), ABBA order, fresh process per trial")
    lines.append("")
    ratio_head = f"{modes[0]}/{modes[1]}" if len(modes) > 1 else ""
    head = "| metric | " + " | ".join(f"{mode} median (min–max)" for mode in modes)
    head += f" | {ratio_head} |" if ratio_head else " |"
    lines.append(head)
    lines.append("|" + "---|" * (1 + len(modes) + (1 if ratio_head else 0)))
    for key, label, scale, unit in METRICS:
        cells = [stats[mode].get(key) for mode in modes]
        if all(c is None for c in cells):
            continue
        row = f"| {label} ({unit}) | " + " | ".join(
            "–" if c is None else f"{_fmt(c['median'], scale)} ({_fmt(c['min'], scale)}–{_fmt(c['max'], scale)})"
            for c in cells)
        if ratio_head:
            r = result["ratio"].get(key)
            row += f" | {'–' if r is None else f'{r:.2f}x'} |"
        else:
            row += " |"
        lines.append(row)
    lines.append("")
    lines.append("- time to ready = from_pretrained + one byte read in every 4 KiB page of every weight "
                 "(all pages resident); ratio > 1 means patched is faster / smaller")
    if result.get("forward_identical") is not None:
        lines.append("- first forward pass: logits identical across the stock and patched trials: "
                     f"**{'yes' if result['forward_identical'] else 'NO'}**")
    ident = "yes" if result.get("identical") else "NO"
    exact = [t for t in result.get("trials", []) if t.get("mode", "stock") in EXACT_MODES]
    lines.append(f"- weights identical across all {len(exact)} stock and patched trials (one digest of names, dtypes, "
                 f"shapes, inference-tensor flags, bytes; tying): **{ident}**" + ("" if result.get("identical") else
                                                          f" — digests {result.get('digests')}"))
    for mode, same in (result.get("matches_stock") or {}).items():
        dtypes = next((t.get("dtypes") for t in result.get("trials", []) if t.get("mode") == mode), None)
        lines.append(f"- {mode}: {'the same model as stock' if same else 'NOT the model stock loads'}"
                     f" ({_dtypes(dtypes)})")
    fh = result.get("fasthug")
    if fh:
        paths = ", ".join(f"{k}×{v}" for k, v in fh["paths"].items())
        reasons = "; ".join(r for r in fh["reasons"] if r)
        lines.append(f"- fasthug_patch path: {paths}" + (f" ({reasons})" if reasons else ""))
    inits = [t["cuda_init_s"] for t in result.get("trials", []) if t.get("cuda_init_s") is not None]
    if inits:
        lines.append(f"- CUDA context created before the timer in every trial: {statistics.median(inits):.2f} s "
                     f"median ({min(inits):.2f}-{max(inits):.2f}), not in the times above")
    if result.get("cold"):
        res = [t.get("resident_before") for t in result.get("trials", []) if t.get("resident_before") is not None]
        if res:
            lines.append(f"- page-cache residency right after each eviction: max {max(res) * 100:.1f}%")
    c = result.get("ceilings")
    if c:
        if c.get("error"):
            lines.append(f"- ceilings: {c['error']}")
        else:
            lines.append("- " + format_ceilings(c, size, result.get("checkpoint_bytes") or size))
    lines.append(f"- machine: {m.get('cpu')}, {m.get('cores')} cores, "
                 f"{(m.get('ram_bytes') or 0) / 2**30:.0f} GiB RAM, Linux {m.get('kernel')}, "
                 f"Python {m.get('python')}, torch {m.get('torch')}, transformers {m.get('transformers')}")
    lines.append(f"- rerun: `{result['command']}`")
    return "\n".join(lines)


def format_ceilings(c: dict, weight_bytes: int | None, file_bytes: int | None = None) -> str:
    """One line of GB/s figures, each with the time it would take for this model: memory
    copies for the loaded weights' bytes, file reads for the checkpoint's bytes."""
    file_bytes = file_bytes or weight_bytes
    parts = []
    for key, label, nbytes, what in (("memcpy_gbps", "memcpy (prefaulted)", weight_bytes, "weights"),
                                     ("fresh_memcpy_gbps", "memcpy into fresh memory", weight_bytes, "weights"),
                                     ("fresh_write_gbps", "first write of a new process's memory", weight_bytes,
                                      "weights"),
                                     ("mmap_warm_gbps", "warm page cache via mmap", file_bytes, "files"),
                                     ("cold_read_gbps", "cold disk pread", file_bytes, "files"),
                                     ("h2d_pinned_gbps", "host-to-device from pinned memory", file_bytes, "files"),
                                     ("h2d_pageable_gbps", "host-to-device from pageable memory", file_bytes,
                                      "files")):
        v = c.get(key)
        if v:
            floor = f" ({_seconds(nbytes / 1e9 / v)} for the {what})" if nbytes else ""
            extra = f" @{c.get('cold_read_best_threads')} threads" if key == "cold_read_gbps" else ""
            parts.append(f"{label} {v:.2f} GB/s{extra}{floor}")
    if c.get("bare_cast_s"):
        parts.append(f"bare cast of the files to {c.get('bare_cast_dtype')} on {c.get('bare_cast_threads')} threads "
                     f"{_seconds(c['bare_cast_s'])}")
    note = f" ({c['note']})" if c.get("note") else ""
    if file_bytes is not None and file_bytes < 256 << 20:
        note += " (checkpoint under 256 MiB: the file ceilings are not representative)"
    return "ceilings: " + "; ".join(parts) + note


def _seconds(s: float) -> str:
    return f"{s:.2f}s" if s >= 0.1 else f"{s * 1e3:.2f}ms"


def _dtypes(counts) -> str:
    if not counts:
        return "?"
    total = sum(counts.values()) or 1
    if len(counts) == 1:
        return next(iter(counts))
    parts = []
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        pct = v / total * 100
        parts.append(f"{k} {pct:.1f}%" if pct >= 0.1 else f"{k} <0.1%")
    return ", ".join(parts)


def plot(result: dict, filename: str) -> None:
    """Bar chart of the medians (min–max whiskers) per metric and mode. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    shown = [(k, label, scale, unit) for k, label, scale, unit in METRICS
             if any(result["stats"][m].get(k) for m in modes)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6))
    if len(shown) == 1:
        axes = [axes]
    for ax, (key, label, scale, unit) in zip(axes, shown):
        cells = [result["stats"][m].get(key) for m in modes]
        med = [(c["median"] * scale) if c else 0 for c in cells]
        err = [[(c["median"] - c["min"]) * scale if c else 0 for c in cells],
               [(c["max"] - c["median"]) * scale if c else 0 for c in cells]]
        ax.bar(modes, med, yerr=err, capsize=4, color=["#999999", "#2b7bba", "#e08214"][: len(modes)])
        ax.set_title(label if len(label) < 28 else label.split(" (")[0], fontsize=9)
        ax.set_ylabel(unit)
    fig.suptitle(f"{os.path.basename(str(result['path']).rstrip('/'))}: "
                 f"{'cold' if result['cold'] else 'warm'}, n={result['n']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)
