"""The benchmark suite's own logic (fasthug_patch.bench, fasthug_patch.cli), on a tiny
checkpoint: trial JSON, digests, statistics, ABBA order, page-cache eviction, tables, CLI.

Each trial is a fresh Python process (a few seconds to import torch and transformers on
a small machine), so the file keeps the number of subprocesses to about ten.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fasthug_patch import cli
from fasthug_patch.bench import checkpoints, runner, trial

ROOT = Path(__file__).resolve().parent.parent
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HEX = set("0123456789abcdef")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FASTHUG_ENABLE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return checkpoints.build_checkpoint("llama", "tiny", "bf16", tmp_path_factory.mktemp("ckpt") / "tiny",
                                        progress=False)


@pytest.fixture(scope="module")
def perturbed(tiny, tmp_path_factory) -> str:
    """The tiny checkpoint with the lowest bit of one element of one weight flipped."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("ckpt") / "perturbed"
    shutil.copytree(tiny, out)
    tensors = load_file(str(out / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    t = tensors[key].clone()
    t.view(torch.int16).view(-1)[5] ^= 1
    tensors[key] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.fixture(scope="module")
def pair(tiny) -> dict:
    """One stock and one patched trial on the tiny checkpoint, with a forward pass (the
    patched one asked to create a CUDA context first, which a CPU trial ignores)."""
    return {mode: runner.run_trial(tiny, mode, forward=True, timeout=300, cuda_first=mode == "patched")
            for mode in ("stock", "patched")}


# --------------------------------------------------------------------------- trials


@pytest.mark.parametrize("mode", ["stock", "patched"])
def test_trial_json_fields(pair, tiny, mode):
    t = pair[mode]
    for key in ("from_pretrained_s", "ready_s", "touch_s", "forward_s", "peak_rss_bytes", "rss_after_bytes",
                "weight_bytes", "digest", "tie_digest", "forward_digest", "versions", "fasthug", "model_class"):
        assert key in t, key
    assert t["mode"] == mode and t["path"] == tiny
    assert t["model_class"] == "LlamaForCausalLM"
    assert 0 < t["from_pretrained_s"] <= t["ready_s"] < 60
    assert t["ready_s"] == pytest.approx(t["from_pretrained_s"] + t["touch_s"], abs=1e-6)
    assert 0 < t["forward_s"] < 60
    assert t["peak_rss_bytes"] >= t["rss_before_bytes"] > 10 << 20
    n_params = checkpoints.param_count("tiny")
    assert t["weight_bytes"] >= 2 * n_params  # bf16 on 5.x (auto), fp32 on 4.x; plus rotary buffers
    assert t["spanned_bytes"] >= t["weight_bytes"]
    assert len(t["load_faults"]) == 2 and len(t["touch_faults"]) == 2 and min(t["touch_faults"]) >= 0
    assert len(t["digest"]) == {"sha256": 64, "xxh3_128": 32}[t["digest_algorithm"]] and set(t["digest"]) <= HEX
    assert set(t["versions"]) == {"python", "torch", "transformers"}
    assert t["fasthug_enable_env"] is None
    assert t["cuda_init_s"] is None  # a CPU trial has no CUDA context to create
    if mode == "stock":
        assert t["fasthug"] is None
        assert t["fasthug_imported"] is False
    else:
        assert t["fasthug_imported"] is True
        assert t["fasthug"]["path"] == "fast", t["fasthug"]
        assert t["fasthug"]["bytes"] > 0


def test_digests_equal_between_stock_and_patched(pair):
    assert pair["stock"]["digest"] == pair["patched"]["digest"]
    assert pair["stock"]["tie_digest"] == pair["patched"]["tie_digest"]
    assert pair["stock"]["forward_digest"] == pair["patched"]["forward_digest"]
    assert runner.check_identical(list(pair.values()))["identical"] is True


def test_digest_differs_for_perturbed_checkpoint(pair, perturbed):
    other = runner.run_trial(perturbed, "patched", timeout=300)
    assert other["digest"] != pair["patched"]["digest"]
    assert other["tie_digest"] == pair["patched"]["tie_digest"]
    assert runner.check_identical([pair["stock"], other])["identical"] is False


def test_trials_inside_inference_mode_load_the_same_model(tiny, pair):
    serving = {mode: runner.run_trial(tiny, mode, timeout=300, inference_mode=True) for mode in ("stock", "patched")}
    assert serving["patched"]["fasthug"]["path"] == "fast"
    assert serving["stock"]["digest"] == serving["patched"]["digest"]
    # tensors made inside the mode (4.x: every weight; both lines: the buffers built with the
    # model) are inference tensors, which the digest tells apart from a load outside it
    assert serving["stock"]["digest"] != pair["stock"]["digest"]


def test_module_run_stock_never_imports_plugin(tiny):
    """``python -m fasthug_patch.bench.trial --mode stock`` with FASTHUG_ENABLE=1 set: it
    re-executes itself as a script without the variable, so the plugin is not imported."""
    proc = subprocess.run([sys.executable, "-m", "fasthug_patch.bench.trial", "--mode", "stock", "--path", tiny,
                           "--dtype", "fp32"], env=_env(FASTHUG_ENABLE="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON line on stdout
    t = json.loads(lines[0])
    assert t["fasthug_imported"] is False and t["fasthug_enable_env"] is None and t["fasthug"] is None
    assert set(t["dtypes"]) == {"float32"}


def test_weights_digest_in_process():
    """The digest covers bytes, dtypes, names and shapes; the tie digest covers tying."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 4))
    base = trial.weights_digest(model)
    assert base == trial.weights_digest(model)
    original = model[0].weight[0, 0].item()
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    assert trial.weights_digest(model) != base
    with torch.no_grad():
        model[0].weight[0, 0] = original
    assert trial.weights_digest(model) == base
    assert trial.weights_digest(model.to(torch.float64)) != base
    model = model.to(torch.float32)
    assert trial.weights_digest(model) == base
    with torch.inference_mode():  # the same bytes as inference tensors: not the same model
        inference = torch.nn.Parameter(model[0].weight.detach().clone())
    plain = model[0].weight
    model[0].weight = inference
    assert trial.weights_digest(model) != base
    model[0].weight = plain
    assert trial.weights_digest(model) == base
    model[1].bias = torch.nn.Parameter(model[1].bias.detach().reshape(2, 2))
    assert trial.weights_digest(model) != base

    a = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    b = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    b.load_state_dict(a.state_dict())
    assert trial.weights_digest(a) == trial.weights_digest(b)
    assert trial.tie_digest(a) == trial.tie_digest(b)
    b[1].weight = b[0].weight  # tie: same values only if equal, so tie both to a's first
    a[1].weight = torch.nn.Parameter(a[0].weight.detach().clone())
    assert trial.weights_digest(a) == trial.weights_digest(b)
    assert trial.tie_digest(a) != trial.tie_digest(b)
    assert trial.weight_bytes(b) == 4 * 16 and trial.weight_bytes(a) == 2 * 4 * 16
    assert trial.touch_pages(b) == 4 * 16


@pytest.mark.parametrize("xxhash_installed", [False, True])
def test_the_digest_algorithm_is_named_as_the_results_expect(xxhash_installed, monkeypatch):
    """xxhash calls its hasher "XXH3_128"; the results (and test_trial_json_fields) say
    "xxh3_128". The CI environments have no xxhash, so a stand-in plays it here."""
    import hashlib
    import types

    fake = types.SimpleNamespace(xxh3_128=lambda: types.SimpleNamespace(name="XXH3_128"))
    monkeypatch.setitem(sys.modules, "xxhash", fake if xxhash_installed else None)  # None: ImportError
    assert trial.digest_algorithm() == ("xxh3_128" if xxhash_installed else hashlib.sha256().name)


def test_prequantised_checkpoints_are_recognised_from_their_config():
    """A saved bitsandbytes model's config carries quantization_config as a dict (read back)
    or an object (in memory); either makes the trial import bitsandbytes before the timer."""
    import types

    import transformers

    assert trial._prequantised_with_bnb(types.SimpleNamespace(quantization_config={"quant_method": "bitsandbytes"}))
    assert trial._prequantised_with_bnb(types.SimpleNamespace(
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True)))
    assert not trial._prequantised_with_bnb(types.SimpleNamespace(quantization_config={"quant_method": "gptq"}))
    assert not trial._prequantised_with_bnb(transformers.LlamaConfig())


def test_dtype_kwargs():
    import torch

    assert trial.dtype_kwargs("default", "5.23.0") == {}
    assert trial.dtype_kwargs("auto", "5.23.0") == {"dtype": "auto"}
    assert trial.dtype_kwargs("bf16", "5.23.0") == {"dtype": torch.bfloat16}
    assert trial.dtype_kwargs("fp32", "4.57.6") == {"torch_dtype": torch.float32}
    assert trial.dtype_kwargs("fp16", "4.57.6") == {"torch_dtype": torch.float16}


# --------------------------------------------------------------------------- statistics


def test_summarize_and_ratio():
    assert runner.summarize([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert runner.summarize([4, 1, 2, 3])["median"] == 2.5
    assert runner.summarize([5])["median"] == 5
    assert runner.summarize([]) is None and runner.summarize([None]) is None
    assert runner.ratio(6.0, 2.0) == 3.0
    assert runner.ratio(1.0, 0) is None and runner.ratio(None, 1.0) is None


def _fake(mode, ready, phase="measure", digest="d" * 64, **extra):
    return {"mode": mode, "phase": phase, "from_pretrained_s": ready * 0.9, "ready_s": ready, "forward_s": None,
            "peak_rss_bytes": int(ready * 1e9), "rss_after_bytes": int(ready * 1e9), "digest": digest,
            "tie_digest": "t", "forward_digest": None, **extra}


def test_ready_gbps():
    assert runner.ready_gbps(2_200_000_000, 2.0) == pytest.approx(1.1)
    assert runner.ready_gbps(None, 2.0) is None and runner.ready_gbps(1000, None) is None
    assert runner.ready_gbps(1000, 0.0) is None


def test_compute_stats_ratios_identical():
    trials = [_fake("stock", 99.0, phase="warmup"), _fake("patched", 99.0, phase="warmup")]
    trials += [_fake("stock", v) for v in (4.0, 6.0, 5.0)] + [_fake("patched", v) for v in (1.0, 3.0, 2.0)]
    stats = runner.compute_stats(trials, ("stock", "patched"))
    assert stats["stock"]["ready_s"] == {"median": 5.0, "min": 4.0, "max": 6.0, "n": 3}  # warmup excluded
    assert stats["patched"]["ready_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert stats["stock"]["forward_s"] is None
    ratios = runner.compute_ratios(stats, ("stock", "patched"))
    assert ratios["ready_s"] == pytest.approx(2.5) and ratios["peak_rss_bytes"] == pytest.approx(2.5)
    assert ratios["forward_s"] is None
    assert runner.check_identical(trials)["identical"] is True
    trials[0] = _fake("stock", 99.0, phase="warmup", digest="e" * 64)  # warmup trials count too
    same = runner.check_identical(trials)
    assert same["identical"] is False and len(same["digests"]) == 2


def test_schedule_is_abba():
    plan = runner.schedule(("stock", "patched"), n=4, warmup=1)
    assert [(p["phase"], p["mode"]) for p in plan] == [
        ("warmup", "stock"), ("warmup", "patched"),
        ("measure", "stock"), ("measure", "patched"), ("measure", "patched"), ("measure", "stock"),
        ("measure", "stock"), ("measure", "patched"), ("measure", "patched"), ("measure", "stock")]
    assert [p["round"] for p in plan if p["phase"] == "measure"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert runner.schedule(("a", "b", "c"), n=2, warmup=0) == [
        {"phase": "measure", "round": 0, "mode": m} for m in "abc"] + [
        {"phase": "measure", "round": 1, "mode": m} for m in "cba"]
    assert runner.schedule(n=1, warmup=0) == [{"phase": "measure", "round": 0, "mode": "stock"},
                                              {"phase": "measure", "round": 0, "mode": "patched"}]


def test_run_bench_order_and_result(tiny, monkeypatch):
    """run_bench with the trial process replaced: order, result shape, JSON-ability, table."""
    calls, firsts, modes = [], [], []

    def fake_run_trial(path, mode, dtype, device, forward, quant, python, timeout, settings=None, cuda_first=False,
                       inference_mode=False):
        calls.append((mode, forward))
        firsts.append(cuda_first)
        modes.append(inference_mode)
        return _fake(mode, 2.0 if mode == "stock" else 1.0, weight_bytes=1000, model_class="X",
                     versions={"python": "3", "torch": "t", "transformers": "tf"},
                     fasthug={"path": "fast", "reason": ""} if mode == "patched" else None)

    monkeypatch.setattr(runner, "run_trial", fake_run_trial)
    result = runner.run_bench(tiny, n=3, warmup=1, cold=True, progress=False, dtype="bf16")
    assert [mode for mode, _ in calls] == ["stock", "patched", "stock", "patched", "patched", "stock", "stock",
                                           "patched"]
    assert all(forward for _, forward in calls)  # the first forward pass runs unless asked not to
    assert [t["phase"] for t in result["trials"]].count("warmup") == 2
    assert all(t["resident_before"] is not None for t in result["trials"])  # measured after each evict
    assert result["ratio"]["ready_s"] == pytest.approx(2.0)
    nbytes = result["checkpoint_bytes"]
    assert nbytes > 0 and result["stats"]["patched"]["ready_gbps"]["median"] == pytest.approx(nbytes / 1e9 / 1.0)
    assert result["ratio"]["ready_gbps"] == pytest.approx(2.0)  # a rate: patched/stock, > 1 still means faster
    assert result["identical"] is True
    assert result["fasthug"]["paths"] == {"fast": 4}
    m = result["machine"]
    assert m["cores"] == os.cpu_count() and m["ram_bytes"] > 0 and m["kernel"] and m["cpu"]
    assert m["transformers"] == "tf"
    assert "fasthug_patch.cli bench" in result["command"] and "--cold" in result["command"]
    assert "--dtype bf16" in result["command"] and "-n 3 --warmup 1" in result["command"]
    assert "--no-forward" not in result["command"]
    assert "--no-forward" in runner.run_bench(tiny, n=1, warmup=0, progress=False, forward=False)["command"]
    assert "--cuda-first" not in result["command"] and not any(firsts) and result["cuda_first"] is False
    firsts.clear()
    gpu = runner.run_bench(tiny, n=1, warmup=0, progress=False, device="cuda", cuda_first=True)
    assert firsts == [True, True] and gpu["cuda_first"] is True
    assert "--device cuda --cuda-first" in gpu["command"]
    assert "--inference-mode" not in result["command"] and not any(modes) and result["inference_mode"] is False
    modes.clear()
    serving = runner.run_bench(tiny, n=1, warmup=0, progress=False, inference_mode=True)
    assert modes == [True, True] and "--inference-mode" in serving["command"]
    assert "inside torch.inference_mode()" in runner.format_table(serving)
    json.dumps(result)  # plain JSON-able
    table = runner.format_table(result)
    assert "COLD" in table


# --------------------------------------------------------------------------- page cache


def test_evict_and_residency(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(1 << 20) * 32  # 32 MiB
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass
    before = runner.residency(path)
    assert before > 0.9, f"file not resident after reading it: {before}"
    assert runner.residency(tmp_path) == pytest.approx(before)  # a folder: all its files
    assert runner.evict(tmp_path) == len(data)
    after = runner.residency(path)
    if after > 0.5:
        pytest.skip(f"this filesystem ignores POSIX_FADV_DONTNEED ({after * 100:.0f}% still resident "
                    f"after evict; e.g. tmpfs): cannot check eviction here")
    assert after < 0.1
    with open(path, "rb") as f:
        f.read(1 << 20)
    partly = runner.residency(path)
    assert 0.0 < partly < 0.9  # 1 MiB of 32 (plus read-ahead)


def test_residency_of_empty_file(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert runner.residency(tmp_path / "empty") == 0.0
    assert runner.residency(tmp_path) == 0.0


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_idempotent_and_cached(tiny, tmp_path, monkeypatch):
    marker = Path(tiny) / checkpoints.MARKER
    stamp = marker.stat().st_mtime_ns
    assert checkpoints.build_checkpoint("llama", "tiny", "bfloat16", tiny, progress=False) == tiny
    assert marker.stat().st_mtime_ns == stamp  # not rebuilt
    info = json.loads(marker.read_text())
    assert info["size"] == "tiny" and info["dtype"] == "bfloat16" and info["seed"] == checkpoints.DEFAULT_SEED
    assert not [p for p in Path(tiny).parent.iterdir() if ".tmp-" in p.name]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("mine")
    with pytest.raises(FileExistsError):
        checkpoints.build_checkpoint("llama", "tiny", "bf16", foreign, progress=False)

    monkeypatch.setenv(checkpoints.CACHE_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(checkpoints.DEMO_SIZE_VAR, "tiny")
    path = checkpoints.demo_checkpoint(progress=False)
    assert Path(path).parent == tmp_path / "cache"
    assert (Path(path) / "model.safetensors").is_file() and (Path(path) / "config.json").is_file()
    stamp = (Path(path) / checkpoints.MARKER).stat().st_mtime_ns
    assert checkpoints.demo_checkpoint(progress=False) == path
    assert (Path(path) / checkpoints.MARKER).stat().st_mtime_ns == stamp
    # Same seed, same weights: a second build elsewhere gives identical files.
    again = checkpoints.build_checkpoint("llama", "tiny", "bf16", tmp_path / "again", progress=False)
    assert (Path(again) / "model.safetensors").read_bytes() == (Path(tiny) / "model.safetensors").read_bytes()


def test_quantized_checkpoint_is_built_once_and_marked(tiny, tmp_path):
    """The suite's pre-quantised checkpoints: stock quantises and saves in a subprocess, the
    marker is written last, a second call reuses the directory, a foreign one is refused."""
    pytest.importorskip("bitsandbytes")
    source = shutil.copytree(tiny, tmp_path / "src")
    built = checkpoints.quantized_checkpoint(str(source), "8bit", progress=False)
    marker = Path(built) / checkpoints.MARKER
    info = json.loads(marker.read_text())
    assert info["settings"] == trial.BNB_SETTINGS["8bit"] and info["source"] == str(source)
    config = json.loads((Path(built) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert any(p.name.endswith(".safetensors") for p in Path(built).iterdir())
    stamp = marker.stat().st_mtime_ns
    assert checkpoints.quantized_checkpoint(str(source), "8bit", progress=False) == built
    assert marker.stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    (tmp_path / "src-bnb-4bit").mkdir()
    with pytest.raises(FileExistsError):
        checkpoints.quantized_checkpoint(str(source), "4bit", progress=False)


def test_checkpoint_sizes():
    assert 1.0e9 < checkpoints.param_count("1b") < 1.2e9
    assert 2.1e9 < checkpoints.estimated_bytes("1b", "bf16") < 2.3e9
    assert 2.8e9 < checkpoints.param_count("3b") < 3.4e9
    assert 0.1e9 < checkpoints.param_count("125m") < 0.2e9
    assert checkpoints.param_count("1b") - checkpoints.param_count("1b-tied") == 32000 * 2048  # one head fewer
    assert checkpoints.spec("llama", "3b", "bf16")["shard_size"] == "2GB"
    assert 6.5e9 < checkpoints.param_count("7b") < 7.0e9  # Llama-2-7B: 6.74B
    assert checkpoints.spec("llama", "7b", "bf16")["shard_size"] == "5GB"
    with pytest.raises(ValueError):
        checkpoints.spec("llama", "13b", "bf16")


def test_tiny_param_count_matches_model(tiny):
    import math

    from safetensors import safe_open

    with safe_open(str(Path(tiny) / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert n == checkpoints.param_count("tiny")


# --------------------------------------------------------------------------- tables, CLI


def test_format_table():
    trials = [_fake("stock", 4.0), _fake("patched", 2.0)]
    stats = runner.compute_stats(trials, ("stock", "patched"))
    result = {"modes": ["stock", "patched"], "stats": stats, "ratio": runner.compute_ratios(stats, ("stock", "patched")),
              "path": "/x/ckpt", "weight_bytes": 2.2e9, "loaded_dtypes": {"bfloat16": 10}, "dtype": "default",
              "device": "cpu", "cold": False, "n": 1, "warmup": 0, "model_class": "LlamaForCausalLM",
              "trials": trials, "identical": True, "digests": ["d"], "machine": runner.machine_info(),
              "command": "python -m fasthug_patch.cli bench /x/ckpt", "fasthug": {"paths": {"fast": 1}, "reasons": [""]},
              "ceilings": {"memcpy_gbps": 10.0, "cold_read_gbps": 2.0, "cold_read_best_threads": 4}}
    table = runner.format_table(result)
    lines = table.splitlines()
    assert "| metric | stock median (min–max) | patched median (min–max) | stock/patched |" in lines
    assert "|---|---|---|---|" in lines
    assert "| time to ready (s) | 4.000 (4.000–4.000) | 2.000 (2.000–2.000) | 2.00x |" in lines
    assert any(line.startswith("| peak RSS (GB) | 4.000") for line in lines)
    assert not any("first forward" in line for line in lines)  # no data: no row
    assert "**yes**" in table and "fast×1" in table and "2.2" in table
    assert "cold disk pread 2.00 GB/s @4 threads (1.10s for the files)" in table
    assert "CUDA context" not in table
    result["trials"] = [dict(trials[0], cuda_init_s=0.5), dict(trials[1], cuda_init_s=0.25)]
    assert "- CUDA context created before the timer in every trial: 0.38 s median (0.25-0.50), not in the times above" \
        in runner.format_table(result)
    result["trials"] = trials
    result["checkpoint_bytes"] = 1.1e9
    assert "cold disk pread 2.00 GB/s @4 threads (0.55s for the files)" in runner.format_table(result)
    assert "memcpy (prefaulted) 10.00 GB/s (0.22s for the weights)" in runner.format_table(result)
    assert "rerun: `python -m fasthug_patch.cli bench /x/ckpt`" in table
    assert "logits identical" not in table  # no forward pass ran
    result["forward_identical"] = False
    assert "logits identical across the stock and patched trials: **NO**" in runner.format_table(result)
    result["identical"] = False
    assert "**NO**" in runner.format_table(result)


def test_bare_cast_ceiling_casts_what_the_load_would(tmp_path):
    """ceiling.bare_cast_seconds times a new process casting a file's floating tensors to the
    load's dtype; nothing to cast (or no file) is no figure, not a zero."""
    import torch
    from safetensors.torch import save_file

    from fasthug_patch.bench import ceiling

    path = str(tmp_path / "model.safetensors")
    save_file({"a": torch.randn(300, 50), "b": torch.randn(7), "steps": torch.arange(5)}, path)
    found = ceiling.bare_cast_seconds([path], "bfloat16", repeats=2, threads=2)
    assert found["bare_cast_s"] > 0 and found["bare_cast_dtype"] == "bfloat16" and found["bare_cast_threads"] == 2
    assert ceiling.bare_cast_seconds([path], "float32", repeats=1) == {}  # already float32: nothing to cast
    assert ceiling.bare_cast_seconds([str(tmp_path / "missing.safetensors")], "bfloat16", repeats=1) == {}


def test_cli_explain(tiny):
    proc = subprocess.run([sys.executable, "-m", "fasthug_patch.cli", "explain", tiny, "--device-map", "cpu",
                           "--dtype", "bf16"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("LlamaForCausalLM: fast"), proc.stdout
    assert "weights_format: safetensors" in proc.stdout


def test_cli_bench(tiny, tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run([sys.executable, "-m", "fasthug_patch.cli", "bench", tiny, "-n", "1", "--warmup", "0",
                           "--json", str(out_json), "--plot", str(out_png), "--quiet"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "| time to ready (s) |" in proc.stdout and "**yes**" in proc.stdout
    assert "| first forward pass (s) |" in proc.stdout and "| checkpoint GB/s to ready (GB/s) |" in proc.stdout
    assert "logits identical across the stock and patched trials: **yes**" in proc.stdout
    assert "ceilings: memcpy" in proc.stdout
    result = json.loads(out_json.read_text())
    assert result["identical"] is True and [t["mode"] for t in result["trials"]] == ["stock", "patched"]
    assert result["ceilings"]["cold_read_gbps"] > 0 and result["ceilings"]["memcpy_gbps"] > 0
    assert result["ceilings"]["fresh_write_gbps"] > 0  # a new process's first write, the floor of a cast
    assert result["fasthug"]["paths"] == {"fast": 1}
    if HAS_MPL:
        assert out_png.stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in proc.stdout and not out_png.exists()


def test_cli_demo_exit_codes(monkeypatch, capsys, tmp_path):
    """demo's own logic, with the checkpoint and the bench replaced."""
    seen = {}

    def fake_bench(path, **kwargs):
        seen.update(kwargs, path=path)
        trials = [_fake("stock", 3.0), _fake("patched", 1.0, digest=seen.get("digest", "d" * 64))]
        stats = runner.compute_stats(trials, ("stock", "patched"))
        return {"modes": ["stock", "patched"], "stats": stats, "ratio": runner.compute_ratios(stats, ("stock", "patched")),
                "path": path, "weight_bytes": 1, "loaded_dtypes": {}, "dtype": kwargs["dtype"], "device": "cpu",
                "cold": False, "n": kwargs["n"], "warmup": kwargs["warmup"], "trials": trials,
                **runner.check_identical(trials), "machine": {}, "command": "x", "fasthug": None, "ceilings": None}

    monkeypatch.setattr(checkpoints, "demo_checkpoint", lambda: str(tmp_path))
    monkeypatch.setattr(runner, "run_bench", fake_bench)
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "weights identical: yes" in out and "time to ready 3.00x faster" in out
    assert seen["n"] == 3 and seen["warmup"] == 1 and seen["dtype"] == "default" and seen["path"] == str(tmp_path)
    seen["digest"] = "e" * 64
    assert cli.main(["demo"]) == 1
    assert "weights identical: no" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_cli_bench_quantized_needs_bitsandbytes(tiny, capsys):
    assert cli.main(["bench", tiny, "--load-in-8bit", "-n", "1"]) == 2
    assert "needs bitsandbytes" in capsys.readouterr().err


def test_cli_heavy_imports_are_lazy():
    code = ("import sys, fasthug_patch.cli, fasthug_patch.bench.runner, fasthug_patch.bench.trial, "
            "fasthug_patch.bench.checkpoints; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
