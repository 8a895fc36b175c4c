"""The three ways to turn the patch on, each in a fresh interpreter, and exact unpatching."""

from __future__ import annotations

import json
import os
import site
import sys
import time

import pytest

from tests.tiny import ROOT, run_python, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny") / "llama"))


def _json_tail(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOAD_AND_REPORT = """
import json, sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r})
fh = sys.modules.get("fasthug_patch")
report = fh.last_report() if fh else None
print(json.dumps({{"path": report.path if report else None, "reason": report.reason if report else None}}))
"""


def test_import_before_transformers_patches(tiny):
    out = _json_tail(run_python("import fasthug_patch\n" + LOAD_AND_REPORT.format(path=tiny)))
    assert out["path"] == "fast", out


def test_import_after_transformers_patches(tiny):
    code = (
        "import transformers.modeling_utils\nfrom transformers import AutoModelForCausalLM\n"
        "import fasthug_patch\n" + LOAD_AND_REPORT.format(path=tiny)
    )
    assert _json_tail(run_python(code))["path"] == "fast"


def test_second_import_and_enable_are_noops(tiny):
    out = _json_tail(run_python("""
        import json, importlib, fasthug_patch
        import transformers.modeling_utils as mu
        first = mu.PreTrainedModel.__dict__["from_pretrained"]
        importlib.import_module("fasthug_patch"); fasthug_patch.enable(); fasthug_patch.enable()
        print(json.dumps({"same": mu.PreTrainedModel.__dict__["from_pretrained"] is first,
                          "wrapped": type(first).__name__}))
    """))
    assert out["same"] and out["wrapped"] != "classmethod", out


def test_env_var_activates_without_import(tiny):
    out = _json_tail(run_python(LOAD_AND_REPORT.format(path=tiny), env={"FASTHUG_ENABLE": "1"}))
    assert out["path"] == "fast", out


def test_env_var_zero_keeps_it_off_after_import(tiny):
    out = _json_tail(run_python("""
        import json, fasthug_patch
        import transformers.modeling_utils as mu
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(%r)
        print(json.dumps({"enabled": fasthug_patch.is_enabled(),
                          "wrapped": type(mu.PreTrainedModel.__dict__["from_pretrained"]).__name__,
                          "report": fasthug_patch.last_report() is not None}))
    """ % tiny, env={"FASTHUG_ENABLE": "0"}))
    assert out == {"enabled": False, "wrapped": "classmethod", "report": False}


def test_unset_env_imports_nothing_at_startup():
    out = _json_tail(run_python("""
        import json, sys
        print(json.dumps({m: m in sys.modules for m in ("fasthug_patch", "wrapt", "torch", "transformers")}))
    """))
    assert not any(out.values()), out


def _installed_pth():
    for directory in site.getsitepackages() + [site.getusersitepackages()]:
        candidate = os.path.join(directory, "fasthug_patch.pth")
        if os.path.exists(candidate):
            return directory, candidate
    pytest.fail("fasthug_patch.pth is not installed: run `pip install .` (scripts/run_tests.sh does)")


def test_pth_hook_costs_under_5ms_when_unset(monkeypatch):
    directory, _ = _installed_pth()
    monkeypatch.delenv("FASTHUG_ENABLE", raising=False)
    rounds = 200
    began = time.perf_counter()
    for _ in range(rounds):
        site.addpackage(directory, "fasthug_patch.pth", set())
    per_start = (time.perf_counter() - began) / rounds
    assert per_start < 0.005, f"{per_start * 1e3:.3f} ms per interpreter start"


def test_pth_hook_activates_with_env(tiny):
    _installed_pth()
    out = _json_tail(run_python(
        "import sys, json; print(json.dumps({'loaded': 'fasthug_patch' in sys.modules, "
        "'torch': 'torch' in sys.modules}))",
        env={"FASTHUG_ENABLE": "1"},
    ))
    assert out == {"loaded": True, "torch": False}


def test_installed_pth_is_this_checkouts():
    """The hook tests run the installed copy: it must be the one in fasthug_patch/startup."""
    _, installed = _installed_pth()
    source = os.path.join(ROOT, "fasthug_patch", "startup", "fasthug_patch.pth")
    with open(installed) as a, open(source) as b:
        assert a.read() == b.read(), "the installed fasthug_patch.pth is stale: reinstall the package"


@pytest.mark.parametrize("value, says", [("maybe", True), ("0", False), ("", False), ("off", False)])
def test_pth_hook_leaves_the_plugin_off_for_a_word_it_does_not_know_and_says_so(value, says):
    _installed_pth()
    proc = run_python("import sys; print('fasthug_patch' in sys.modules)", env={"FASTHUG_ENABLE": value})
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
    message = (f"UserWarning: fasthug_patch: FASTHUG_ENABLE={value!r} is not 1/true/yes/on or 0/false/no/off; "
               "the startup hook leaves the plugin off")
    # Once, though a venv's site-packages (and so the hook) is processed twice at start.
    assert proc.stderr.count(message) == (1 if says else 0), proc.stderr


def test_disable_restores_exact_originals(tiny):
    out = _json_tail(run_python("""
        import json, sys
        import transformers.modeling_utils as mu
        import gc
        names = [n for n in ("_load_state_dict_into_meta_model", "convert_and_load_state_dict_in_model",
                             "_get_resolved_checkpoint_files", "_get_dtype", "load_state_dict") if hasattr(mu, n)]
        before = {n: getattr(mu, n) for n in names}
        before_gc = gc.collect
        before_fp = mu.PreTrainedModel.__dict__["from_pretrained"]
        core = sys.modules.get("transformers.core_model_loading")
        before_spawn = getattr(core, "spawn_materialize", None)
        transform = getattr(core, "WeightTransform", None)  # 5.x: its materialize_tensors is wrapped
        before_mt = vars(transform).get("materialize_tensors") if transform else None
        import fasthug_patch
        wrapped_mt = transform is None or vars(transform).get("materialize_tensors") is not before_mt
        changed = [n for n in names if getattr(mu, n) is not before[n]]
        fasthug_patch.disable()
        restored = all(getattr(mu, n) is before[n] for n in names)
        restored_fp = mu.PreTrainedModel.__dict__["from_pretrained"] is before_fp
        restored_spawn = getattr(core, "spawn_materialize", None) is before_spawn and gc.collect is before_gc
        restored_spawn = restored_spawn and wrapped_mt and (
            transform is None or vars(transform).get("materialize_tensors") is before_mt)
        with fasthug_patch.enabled():
            scoped = mu.PreTrainedModel.__dict__["from_pretrained"] is not before_fp
        after_scope = mu.PreTrainedModel.__dict__["from_pretrained"] is before_fp
        print(json.dumps({"changed": len(changed), "restored": restored and restored_fp and restored_spawn,
                          "scoped": scoped, "after_scope": after_scope}))
    """))
    assert out["changed"] >= 1 and out["restored"] and out["scoped"] and out["after_scope"], out


def test_scopes_nest_and_report(tiny):
    out = _json_tail(run_python("""
        import json, fasthug_patch
        from transformers import AutoModelForCausalLM
        fasthug_patch.disable()
        seen = []
        def load():
            AutoModelForCausalLM.from_pretrained(%r)
            seen.append(fasthug_patch.last_report().path if fasthug_patch.is_enabled() else "stock")
        with fasthug_patch.enabled():
            load()
            with fasthug_patch.disabled():
                load()
                with fasthug_patch.enabled():
                    load()
                load()
            load()
        load()
        print(json.dumps(seen))
    """ % tiny))
    assert out == ["fast", "stock", "fast", "stock", "fast", "stock"]


def test_scopes_are_per_thread(tiny):
    """disabled() in one thread leaves other threads on the process-wide switch."""
    out = _json_tail(run_python("""
        import json, threading, fasthug_patch
        from transformers import AutoModelForCausalLM
        from fasthug_patch import report as rep
        barrier = threading.Barrier(2)
        results = {}
        def worker(name, scope):
            with scope():
                barrier.wait()                      # both scopes open at once
                results[name + "_enabled"] = fasthug_patch.is_enabled()
                model = AutoModelForCausalLM.from_pretrained(%r)
                barrier.wait()
        import contextlib
        a = threading.Thread(target=worker, args=("scoped_off", fasthug_patch.disabled))
        b = threading.Thread(target=worker, args=("global_on", contextlib.nullcontext))
        a.start(); b.start(); a.join(); b.join()
        print(json.dumps(results))
    """ % tiny))
    assert out == {"scoped_off_enabled": False, "global_on_enabled": True}


def test_other_threads_follow_global_switch_during_enabled_scope(tiny):
    out = _json_tail(run_python("""
        import json, threading, fasthug_patch
        fasthug_patch.disable()
        seen = {}
        with fasthug_patch.enabled():
            t = threading.Thread(target=lambda: seen.update(other=fasthug_patch.is_enabled()))
            t.start(); t.join()
            seen["self"] = fasthug_patch.is_enabled()
        print(json.dumps(seen))
    """))
    assert out == {"other": False, "self": True}


@pytest.mark.skipif(sys.platform != "linux", reason="fork semantics")
def test_concurrent_loads_in_threads_are_correct(tiny, tmp_path):
    other = save_tiny_llama(str(tmp_path / "other"), seed=1)
    out = _json_tail(run_python("""
        import json, threading, torch, fasthug_patch
        from transformers import AutoModelForCausalLM
        from tests.tiny import state_bytes
        paths = [%r, %r] * 3
        with fasthug_patch.disabled():
            expected = {p: state_bytes(AutoModelForCausalLM.from_pretrained(p)) for p in set(paths)}
        ok = []
        def load(p):
            ok.append(state_bytes(AutoModelForCausalLM.from_pretrained(p)) == expected[p])
        threads = [threading.Thread(target=load, args=(p,)) for p in paths]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(json.dumps(ok))
    """ % (tiny, other)))
    assert out == [True] * 6
