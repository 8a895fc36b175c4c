"""Falling back: stock result or stock error, never a half-loaded model; reasons given."""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import re

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import fasthug_patch
from fasthug_patch import capabilities, settings
from fasthug_patch.capabilities import Facts
from tests.tiny import DTYPE_KWARG, save_tiny_llama, state_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("fb") / "llama"))


def _stock(path, **kwargs):
    with fasthug_patch.disabled():
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _fast(path, **kwargs):
    with fasthug_patch.enabled():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, fasthug_patch.last_report()


def test_error_inside_fast_path_gives_stock_model_and_warning(tiny, monkeypatch, caplog):
    import fasthug_patch.engine.materialize as materialize

    def broken(*args):
        raise RuntimeError("simulated reader failure")

    monkeypatch.setattr(materialize, "_copy_span", broken)
    monkeypatch.setattr(materialize, "_cast_mapped_span", broken)
    monkeypatch.setattr(materialize.Materializer, "_mapped_view", lambda *a: (_ for _ in ()).throw(RuntimeError("simulated reader failure")))
    with caplog.at_level(logging.WARNING):
        model, report = _fast(tiny, **{DTYPE_KWARG: torch.float32})
    assert report.path == "fallback" and "simulated reader failure" in report.reason
    assert any("fast path failed" in r.getMessage() for r in caplog.records)
    assert state_bytes(model) == state_bytes(_stock(tiny, **{DTYPE_KWARG: torch.float32}))


def test_a_redo_by_stock_starts_from_the_calls_random_state(tmp_path, monkeypatch):
    """4.57 initialises missing weights before it loads the others: a fast attempt that then
    fails has drawn random numbers already. Stock's redo must still give the weights, and
    leave the generators, as a plain stock call with the same seed does."""
    import random

    import numpy

    import fasthug_patch.engine.materialize as materialize
    from tests.parity import assert_same_model, edit_safetensors, load_model

    path = save_tiny_llama(str(tmp_path / "missing"))
    edit_safetensors(f"{path}/model.safetensors", drop=["model.layers.0.mlp.up_proj.weight"])

    def load(fast):
        torch.manual_seed(7), random.seed(7), numpy.random.seed(7)
        with fasthug_patch.enabled() if fast else fasthug_patch.disabled():
            model, _ = load_model(AutoModelForCausalLM, path, **{DTYPE_KWARG: torch.bfloat16})
        return model, (torch.rand(4), random.random(), numpy.random.rand())

    stock, stock_draws = load(fast=False)
    monkeypatch.setattr(materialize.Materializer, "submit",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated failure")))
    redone, redone_draws = load(fast=True)
    assert fasthug_patch.last_report().path == "fallback"
    assert stock.config.to_dict() == redone.config.to_dict()
    assert_same_model(stock, redone, context="stock's redo after a failed fast attempt")  # the missing weight too
    assert torch.equal(stock_draws[0], redone_draws[0]) and stock_draws[1:] == redone_draws[1:]


def test_missing_checkpoint_raises_the_stock_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(Exception) as stock_error:
        _stock(missing)
    with pytest.raises(type(stock_error.value)) as fast_error:
        _fast(missing)
    assert str(fast_error.value) == str(stock_error.value)
    assert fasthug_patch.last_report().path == "fallback"


def test_corrupt_weights_raise_the_stock_error_type(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(tiny):
        data = open(os.path.join(tiny, name), "rb").read()
        if name.endswith(".safetensors"):
            data = data[: len(data) // 2]  # truncated mid-tensor
        (bad / name).write_bytes(data)
    with pytest.raises(Exception) as stock_error:
        _stock(str(bad))
    with pytest.raises(type(stock_error.value)):
        _fast(str(bad))


def test_unsupported_call_falls_back_with_reason(tiny):
    stock = _stock(tiny)
    kwargs = dict(config=stock.config, state_dict=stock.state_dict())
    with fasthug_patch.enabled():
        model = type(stock).from_pretrained(None, **kwargs)
    report = fasthug_patch.last_report()
    assert report.path == "fallback" and "state_dict" in report.reason
    with fasthug_patch.disabled():
        assert state_bytes(model) == state_bytes(type(stock).from_pretrained(None, **kwargs))


def test_fallback_result_identical_to_stock_for_declined_load(tiny, monkeypatch):
    """A load-stage decline (here: forced) runs the stock internals for the whole load."""
    real = capabilities.decide

    def decline_load(facts, stage):
        if stage == "load":
            return capabilities.Decision(False, "forced by test", "test")
        return real(facts, stage)

    monkeypatch.setattr(capabilities, "decide", decline_load)
    model, report = _fast(tiny)
    assert report.path == "fallback" and report.reason == "forced by test"
    assert state_bytes(model) == state_bytes(_stock(tiny))


@pytest.mark.parametrize(
    "facts, rule",
    [
        (Facts(transformers_version="3.9.0"), "no-adapter"),
        (Facts(transformers_version="5.999.0"), "untested-version"),
        (Facts(transformers_version=transformers.__version__, model_module="transformers_modules.x"), "remote-code"),
        (Facts(transformers_version="4.42.4", extra={}), "no-adapter"),
        (Facts(transformers_version="6.0.0"), "no-adapter"),
        (Facts(transformers_version=transformers.__version__, quantization="gptq"), "quant-method"),
        (Facts(transformers_version=transformers.__version__, gguf=True), "gguf"),
        (Facts(transformers_version=transformers.__version__, tensor_parallel=True), "tensor-parallel"),
        (Facts(transformers_version=transformers.__version__, deepspeed_zero3=True), "deepspeed-zero3"),
        (Facts(transformers_version=transformers.__version__, device_kinds=frozenset({"disk", "cpu"})), "disk-offload"),
        (Facts(transformers_version="4.57.6", device_kinds=frozenset({"cuda"})), "accelerator-device"),
        (Facts(transformers_version="5.23.0", device_kinds=frozenset({"cuda", "cpu"})), None),
        (Facts(transformers_version="5.23.0", device_kinds=frozenset({"mps"})), "accelerator-device"),
        (Facts(transformers_version=transformers.__version__, state_dict_given=True), "state-dict-given"),
        (Facts(transformers_version=transformers.__version__), None),
    ],
)
def test_capability_rules(facts, rule, monkeypatch):
    monkeypatch.delenv("FASTHUG_UNVERIFIED_GPU", raising=False)
    decision = capabilities.decide(facts, "call")
    assert decision.rule == rule
    assert decision.fast == (rule is None)
    if rule:
        assert decision.reason  # every fallback says why


def test_cuda_reason_points_4x_users_at_model_cuda(monkeypatch):
    monkeypatch.delenv("FASTHUG_UNVERIFIED_GPU", raising=False)
    reason = capabilities.decide(Facts(transformers_version="4.56.2", device_kinds=frozenset({"cuda"})), "load").reason
    assert "4.56.2" in reason and "model.cuda()" in reason
    reason = capabilities.decide(Facts(transformers_version="4.57.6", device_kinds=frozenset({"cuda"})), "load").reason
    assert "4.57.6" in reason and "model.cuda()" in reason and "FASTHUG_UNVERIFIED_GPU=1" in reason
    assert capabilities.decide(Facts(transformers_version="5.23.0", device_kinds=frozenset({"cuda"})), "load").fast


@pytest.mark.parametrize("stage", ["call", "load"])
def test_4_57_streams_to_cuda_once_the_unverified_gpu_paths_are_opted_in(stage, monkeypatch):
    cuda = frozenset({"cuda", "cpu"})
    monkeypatch.setenv("FASTHUG_UNVERIFIED_GPU", "1")
    assert capabilities.decide(Facts(transformers_version="4.57.6", device_kinds=cuda), stage).fast
    older = capabilities.decide(Facts(transformers_version="4.56.2", device_kinds=cuda), stage)
    assert not older.fast and "4.57 or 5.x" in older.reason
    monkeypatch.setenv("FASTHUG_UNVERIFIED_GPU", "0")
    assert not capabilities.decide(Facts(transformers_version="4.57.6", device_kinds=cuda), stage).fast


def test_untested_version_can_be_opted_in(monkeypatch):
    monkeypatch.setenv("FASTHUG_ALLOW_UNTESTED", "1")
    assert capabilities.decide(Facts(transformers_version="5.999.0"), "call").fast


def test_device_kinds():
    assert capabilities.device_kinds(None) == {"cpu"}
    assert capabilities.device_kinds("cpu") == {"cpu"}
    assert capabilities.device_kinds({"a": 0, "b": "cpu"}) == {"cuda", "cpu"}
    assert capabilities.device_kinds(torch.device("cuda:1")) == {"cuda"}
    assert capabilities.device_kinds("auto") == {"auto"}


def test_explain_without_loading(tiny, monkeypatch):
    monkeypatch.delenv("FASTHUG_UNVERIFIED_GPU", raising=False)
    assert fasthug_patch.explain(tiny).fast
    explanation = fasthug_patch.explain(tiny, device_map="mps")
    assert not explanation.fast and "mps" in str(explanation)
    on_gpu = fasthug_patch.explain(tiny, device_map="cuda")  # streamed on 5.x, stock on 4.x
    assert on_gpu.fast == transformers.__version__.startswith("5."), str(on_gpu)
    assert not fasthug_patch.explain(tiny, tp_plan="auto").fast


def test_compatibility_doc_is_generated_and_current():
    from fasthug_patch import compat_doc

    assert compat_doc.main(["--check"]) == 0, "run python -m fasthug_patch.compat_doc"
    text = compat_doc.render()
    assert all(f"`{rule.key}`" in text for rule in capabilities.RULES)
    assert f"`{settings.ALLOW_UNTESTED_VAR}=1`" in text, "the opt-in variable is named, not a template"


def _message_fragments(node) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp):
        return _message_fragments(node.left) + _message_fragments(node.right)
    return []


def test_troubleshooting_lists_every_warning_and_error():
    """docs/troubleshooting.md names every capability rule, every exception class of
    errors.py, and (by its longest literal piece) every message the package raises with
    one of them or warns with."""
    from fasthug_patch import errors

    root = pathlib.Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "troubleshooting.md").read_text()
    missing = [f"rule `{rule.key}`" for rule in capabilities.RULES if f"`{rule.key}`" not in doc]
    missing += [name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, Exception)
                and obj.__module__ == errors.__name__ and name not in doc]
    message_arg = {"CheckpointError": 2, "CheckpointPathError": 1, "FastPathError": 0, "Unsupported": 0,
                   "warn": 0, "warning": 0}
    for file in sorted((root / "fasthug_patch").rglob("*.py")):
        if "bench" in file.relative_to(root).parts:
            continue  # command-line tools; summarised in the doc's last sections
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in message_arg and len(node.args) > message_arg[name]:
                fragments = _message_fragments(node.args[message_arg[name]])
                pieces = [p.strip(" :;,()'\"") for f in fragments for p in re.split(r"%[sdr]", f)]
                longest = max(pieces, key=len, default="")
                if longest and longest not in doc:
                    missing.append(f"{file.relative_to(root)}:{node.lineno}: {longest!r}")
    assert not missing, "add to docs/troubleshooting.md: " + "; ".join(missing)


def test_garbage_collector_is_off_during_a_fast_load_and_restored_after(tiny, monkeypatch):
    import gc

    import fasthug_patch.engine.materialize as materialize

    seen = []
    real_submit = materialize.Materializer.submit

    def submit(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return real_submit(self, *args, **kwargs)

    monkeypatch.setattr(materialize.Materializer, "submit", submit)
    assert gc.isenabled()
    _, report = _fast(tiny)
    assert report.path == "fast" and seen and not any(seen)
    assert gc.isenabled()

    def broken(self, *args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(materialize.Materializer, "submit", broken)
    _, report = _fast(tiny)  # falls back to stock
    assert report.path == "fallback" and gc.isenabled()
    gc.disable()
    try:
        _fast(tiny)
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()
