"""The benchmark suite's bookkeeping: which cells run, where results go, how the page reads."""

from __future__ import annotations

import json
import os

import pytest

from fasthug_patch.bench import runner, suite
from tests.test_bench import _fake

CPU_457 = {"transformers": "4.57.6", "cuda": False, "fasthug": True}
CPU_5 = {"transformers": "5.23.0", "cuda": False, "fasthug": False}


def _scenario(key):
    return next(s for s in suite.SCENARIOS if s.key == key)


def test_every_issue_scenario_is_listed():
    keys = {s.key for s in suite.SCENARIOS}
    assert {"S1", "S2", "S3", "S4-int8", "S4-nf4", "S5-int8", "S5-nf4", "S6"} <= keys


@pytest.mark.parametrize("key,info,size,skipped", [
    ("S1", CPU_5, "1b", False),
    ("S6", CPU_5, "1b", True),  # no GPU
    ("S4-nf4", dict(CPU_457, bitsandbytes=True), "1b", False),  # 4.57 quantises on the fly on the CPU
    ("S4-nf4", dict(CPU_457, transformers="4.56.2", bitsandbytes=True), "1b", True),  # before 4.57: stock
    ("S4-nf4", dict(CPU_5, bitsandbytes=True), "1b", False),
    ("S4-nf4", dict(CPU_5, bitsandbytes=False), "1b", True),
    ("S5-int8", dict(CPU_457, bitsandbytes=True), "1b", False),  # against stock 4.57
    ("S5-int8", dict(CPU_5, bitsandbytes=True), "3b", True),  # 1b only
    ("D4", CPU_5, "1b", True),  # 5.x has no fp32 default
    ("D4", CPU_457, "1b", False),
    ("S3", CPU_457, "3b", True),  # a 12 GB fp32 checkpoint
    ("F1", CPU_457, "1b", False),
    ("F1", CPU_457, "125m", True),  # one size only
    ("F1", CPU_5, "1b", True),
    ("S3d", CPU_5, "1b", False),
    ("S3d", CPU_5, "125m", True),  # a setting's scenario runs at 1b
    ("S5g-nf4", dict(CPU_5, cuda=True, bitsandbytes=True), "1b", False),
    ("S5g-nf4", dict(CPU_5, cuda=True, bitsandbytes=False), "1b", True),  # a GPU image without bitsandbytes
    ("S4g-int8", dict(CPU_5, cuda=True), "1b", True),
    ("S4g-int8", dict(CPU_457, cuda=True, bitsandbytes=True), "1b", False),  # against stock 4.57
    ("S5g-int8", dict(CPU_457, cuda=True, bitsandbytes=True), "1b", False),  # against stock 4.57
    ("S5g-int8", CPU_457, "1b", True),
])
def test_skip_reasons(key, info, size, skipped):
    reason = suite.skip_reason(_scenario(key), info, size)
    assert (reason is not None) == skipped
    if skipped:
        assert len(reason) > 10  # a sentence a reader can act on


def _result(scenario, size, stock, patched, cold=False, **extra):
    trials = [_fake("stock", stock, ready_gbps=runner.ready_gbps(2.2e9, stock)),
              _fake("patched", patched, ready_gbps=runner.ready_gbps(2.2e9, patched))]
    modes = ("stock", "patched")
    stats = runner.compute_stats(trials, modes)
    out = {"scenario": scenario, "size": size, "title": _scenario(scenario).title, "modes": list(modes),
           "stats": stats, "ratio": runner.compute_ratios(stats, modes), "identical": True, "cold": cold,
           "checkpoint_bytes": 2.2e9, "weight_bytes": 2.2e9, "machine": runner.machine_info(),
           "command": f"bench {scenario}", "started": "2026-11-23 05:00:00", "trials": trials}
    out.update(extra)
    return out


def _write(root, version, name, data):
    path = os.path.join(root, suite.RESULTS_DIR, version, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_render_reads_every_result_and_says_what_was_skipped(tmp_path):
    root = str(tmp_path)
    _write(root, "5.23.0", "S1-1b.json", _result("S1", "1b", 0.30, 0.25,
                                                  ceilings={"memcpy_gbps": 11.0, "cold_read_gbps": 2.2}))
    _write(root, "5.23.0", "S2-1b.json", _result("S2", "1b", 2.0, 1.25, cold=True,
                                                  ceilings={"memcpy_gbps": 11.0, "cold_read_gbps": 2.2}))
    _write(root, "5.23.0", "S6-1b.json", {"skipped": "needs a CUDA GPU; none on this machine", "scenario": "S6",
                                           "size": "1b"})
    _write(root, "4.57.6", "D4-1b.json", _result("D4", "1b", 2.7, 1.8, identical=False,
                                                  fasthug_error="AssertionError: model.embed_tokens.weight"))
    page = suite.render(root)
    assert page.index("## transformers 5.23.0") < page.index("## transformers 4.57.6")
    assert "| 1.60x |" in page  # 2.0 / 1.25
    assert "S6 1b: not run (needs a CUDA GPU" in page
    assert "fails: `AssertionError: model.embed_tokens.weight`" in page
    assert "| NO |" in page  # a mismatch is shown, not hidden
    # of ceiling, cold: 2.2 GB at 2.2 GB/s = 1 s, against 1.25 s patched
    assert "| 80% |" in page
    assert "bench S2" in page  # the command to rerun it
    # patched GB/s: the checkpoint's 2.2 GB over patched time to ready, 1.25 s
    row = next(line for line in page.splitlines() if line.startswith("| S2 "))
    assert "| 1.60x | 1.76 |" in row


def test_render_shows_the_first_forward_pass_and_logits_that_differ(tmp_path):
    root = str(tmp_path)
    result = _result("S1", "1b", 0.30, 0.25)
    for trial, seconds in zip(result["trials"], (0.5, 0.4)):
        trial["forward_s"] = seconds
    result["stats"] = runner.compute_stats(result["trials"], ("stock", "patched"))
    _write(root, "5.23.0", "S1-1b.json", dict(result, forward_identical=True))
    row = next(line for line in suite.render(root).splitlines() if line.startswith("| S1 "))
    assert "| 0.50 / 0.40 |" in row and row.endswith("| yes |")
    _write(root, "5.23.0", "S1-1b.json", dict(result, forward_identical=False))
    row = next(line for line in suite.render(root).splitlines() if line.startswith("| S1 "))
    assert row.endswith("| yes, but the logits differ |")


def test_rows_from_different_machines_are_labelled(tmp_path):
    root = str(tmp_path)
    _write(root, "5.23.0", "S1-1b.json", _result("S1", "1b", 0.30, 0.25))
    page = suite.render(root)
    assert "Machine: " in page and "[A]" not in page
    other = _result("S2", "1b", 2.0, 1.25, cold=True)
    other["machine"] = {**other["machine"], "cpu": "Some Other CPU"}
    _write(root, "5.23.0", "S2-1b.json", other)
    page = suite.render(root)
    assert "more than one machine" in page and "[B] Some Other CPU" in page
    row = next(line for line in page.splitlines() if line.startswith("| S2 "))
    assert "[B]" in row


def test_ceiling_fraction_needs_all_inputs():
    assert suite.ceiling_fraction(_result("S1", "1b", 1.0, 1.0)) is None
    warm = _result("S1", "1b", 1.0, 0.5, ceilings={"memcpy_gbps": 4.4})
    assert warm and suite.ceiling_fraction(warm) == pytest.approx(1.0)


def test_a_warm_cast_is_measured_against_writing_its_result_into_fresh_memory(tmp_path):
    ceilings = {"memcpy_gbps": 10.0, "fresh_write_gbps": 4.0, "cold_read_gbps": 1.0}
    # D4: a 2.2 GB bf16 checkpoint loaded as 4.4 GB of fp32; 4.4 GB at 4 GB/s = 1.1 s, patched 2.2 s
    d4 = _result("D4", "1b", 3.0, 2.2, ceilings=ceilings, weight_bytes=4.4e9)
    assert runner.is_warm_cast(d4) and suite.ceiling_fraction(d4) == pytest.approx(0.5)
    # the same sizes cold, or quantised, or same-dtype: not a warm cast, the old ceilings
    cold = dict(d4, cold=True)
    assert not runner.is_warm_cast(cold) and suite.ceiling_fraction(cold) == pytest.approx(2.2 / 1.0 / 2.2)
    assert not runner.is_warm_cast(dict(d4, quant="8bit"))
    # a pre-quantised checkpoint (S5): a few unquantised tensors are cast, the rest placed as read
    prequantised = dict(d4, prequantized="bitsandbytes", weight_bytes=1.2311e9, checkpoint_bytes=1.2328e9)
    assert not runner.is_warm_cast(prequantised)
    assert suite.cast_floor_lines([prequantised]) == []
    same = _result("S1", "1b", 1.0, 0.5, ceilings=ceilings)
    # same dtype: the header, config files and the model's own buffers make the sizes differ a little
    assert not runner.is_warm_cast(dict(same, checkpoint_bytes=2200121218, weight_bytes=2200097024 + 256))
    assert not runner.is_warm_cast(same) and suite.ceiling_fraction(same) == pytest.approx(2.2 / 10.0 / 0.5)
    # a warm cast measured before the floor existed shows no figure rather than the memcpy one
    assert suite.ceiling_fraction(dict(d4, ceilings={"memcpy_gbps": 10.0})) is None
    # the page says what the floor allows: stock 3.0 s over 1.1 s
    assert suite.cast_floor_lines([same]) == []
    assert suite.cast_floor_lines([d4, cold]) == [
        "- D4 1b: 4.40 GB at 4.00 GB/s = 1.10 s; stock 3.00 s, patched 2.20 s; at most 2.73x over stock is possible"]
    root = str(tmp_path)
    _write(root, "4.57.6", "D4-1b.json", d4)
    assert "at most 2.73x over stock is possible" in suite.render(root)
    # with the same version's S1 row of that size, building the model is part of the floor:
    # the faster side's from_pretrained there (0.20 s), so 3.0 s over 1.1 + 0.2 s
    s1 = _result("S1", "1b", 0.30, 0.25)
    s1["stats"]["stock"]["from_pretrained_s"] = {"median": 0.25, "min": 0.2, "max": 0.3}
    s1["stats"]["patched"]["from_pretrained_s"] = {"median": 0.20, "min": 0.2, "max": 0.3}
    assert suite.cast_floor_lines([d4, s1, _result("S1", "125m", 0.1, 0.1)]) == [
        "- D4 1b: 4.40 GB at 4.00 GB/s = 1.10 s, plus 0.20 s building the model (S1's from_pretrained) = 1.30 s; "
        "stock 3.00 s, patched 2.20 s; at most 2.31x over stock is possible"]


def test_a_measured_bare_cast_is_the_warm_casts_closer_floor():
    """Where the bare cast was measured (the same cast with no model), the row's *of
    ceiling* is that time over patched, and the floor lines say what it leaves to gain."""
    ceilings = {"memcpy_gbps": 10.0, "fresh_write_gbps": 4.0, "bare_cast_s": 1.65, "bare_cast_dtype": "float32",
                "bare_cast_threads": 2}
    d4 = _result("D4", "1b", 3.0, 2.2, ceilings=ceilings, weight_bytes=4.4e9)
    assert suite.ceiling_fraction(d4) == pytest.approx(1.65 / 2.2)
    s1 = _result("S1", "1b", 0.30, 0.25)
    s1["stats"]["patched"]["from_pretrained_s"] = {"median": 0.20, "min": 0.2, "max": 0.3}
    lines = suite.cast_floor_lines([d4, s1])
    assert lines[1] == ("- D4 1b, the cast itself: a new process casting the files' tensors to float32 into fresh "
                        "memory on 2 threads, no model, 1.65 s, plus 0.20 s building the model = 1.85 s; at most "
                        "1.62x over stock is possible, patched is at 84% of it")
    # not a warm cast: the bare cast is not its ceiling
    assert suite.ceiling_fraction(dict(d4, cold=True, ceilings=dict(ceilings, cold_read_gbps=1.0))) == \
        pytest.approx(2.2 / 1.0 / 2.2)


def test_a_warm_cast_gets_its_floor_measured_at_the_size_of_its_result(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    cast = _result("D4", "1b", 3.0, 2.2, ceilings={"memcpy_gbps": 10.0}, weight_bytes=64 << 20,
                   path=str(tmp_path), loaded_dtypes={"bfloat16": 8192, "float32": 256})
    runner.add_cast_floor(cast)
    assert cast["ceilings"]["fresh_write_bytes"] == 64 << 20 and cast["ceilings"]["fresh_write_gbps"] > 0
    assert cast["ceilings"]["memcpy_gbps"] == 10.0
    # and the bare cast of its files, to the dtype most of the loaded bytes have
    assert cast["ceilings"]["bare_cast_s"] > 0 and cast["ceilings"]["bare_cast_dtype"] == "bfloat16"
    same = _result("S1", "1b", 1.0, 0.5, ceilings={"memcpy_gbps": 10.0})
    runner.add_cast_floor(same)
    assert same["ceilings"] == {"memcpy_gbps": 10.0}
    failed = dict(cast, ceilings={"error": "ceiling run failed"})
    runner.add_cast_floor(failed)
    assert failed["ceilings"] == {"error": "ceiling run failed"}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    root = str(tmp_path)
    _write(root, "5.23.0", "S1-1b.json", _result("S1", "1b", 0.30, 0.25))
    _write(root, "5.23.0", "S1-125m.json", dict(_result("S1", "125m", 0.10, 0.09), checkpoint_bytes=2.7e8))
    suite.plot(root, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmarks_page_is_what_the_suite_renders_from_the_stored_results():
    """docs/benchmarks.md holds only numbers the suite measured: rendering bench/results/
    again must give the page byte for byte."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, suite.RESULTS_DIR)):
        pytest.skip("no stored results in this checkout")
    with open(os.path.join(root, suite.DOC)) as f:
        assert f.read() == suite.render(root), "run `python bench/suite.py render` and commit the page"


def test_stored_results_are_of_scenarios_the_suite_defines():
    """A result left behind by a renamed or removed scenario would be rendered as if current."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keys = {s.key for s in suite.SCENARIOS}
    stale = [f"{r['_version_dir']}/{r['scenario']}-{r['size']}" for r in suite.load_results(root)
             if r["scenario"] not in keys]
    assert not stale, f"delete these results or define their scenarios: {stale}"


@pytest.mark.parametrize("kind", ["cold", "cast"])
def test_io_strategy_microbenchmarks_run(tmp_path, kind):
    """bench/io_strategies.py, whose numbers docs/design.md quotes, still runs."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    path = str(tmp_path / "w.safetensors")
    save_file({"w": torch.randn(1 << 20)}, path)  # 4 MiB of fp32
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "io_strategies.py")
    out = subprocess.run([sys.executable, script, kind, path, "--threads", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    strategies = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert strategies == list(("populate", "fill_populate", "fill_touch", "willneed_populate", "willneed_touch",
                               "preadv_fresh", "odirect_fresh") if kind == "cold"
                              else ("mapped", "mapped_release", "prefault_release"))
    assert not any("failed" in line for line in out.stdout.splitlines()[1:] if "odirect" not in line), out.stdout
    only = subprocess.run([sys.executable, script, kind, path, "--threads", "2", "--rounds", "1",
                           "--only", f"{strategies[-1]},nonsense,{strategies[0]}"],
                          capture_output=True, text=True, timeout=300)
    assert [line.split()[0] for line in only.stdout.splitlines()[1:]] == [strategies[-1], strategies[0]]


def test_quantization_method_reads_the_checkpoints_config(tmp_path):
    from fasthug_patch.bench import checkpoints

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    assert checkpoints.quantization_method(tmp_path) == "bitsandbytes"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert checkpoints.quantization_method(tmp_path) is None
    assert checkpoints.quantization_method(tmp_path / "missing") is None


def test_a_settings_scenario_sets_them_for_the_patched_trials_only(monkeypatch):
    monkeypatch.delenv("FASTHUG_IO", raising=False)
    settings = dict(_scenario("S3d").settings)
    assert settings == {"FASTHUG_IO": "direct"}
    assert runner.trial_env("patched", settings)["FASTHUG_IO"] == "direct"
    assert "FASTHUG_IO" not in runner.trial_env("stock", settings)
    command = runner.rerun_command("/c", ("stock", "patched"), 5, 1, True, "bf16", "cpu", False, "python",
                                   settings=settings)
    assert command.startswith("FASTHUG_IO=direct PYTHONPATH=") and "--cold" in command
