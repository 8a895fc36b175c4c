"""Loads under the calling thread's tensor modes (fasthug_patch/thread_modes.py): inside
``torch.inference_mode()``, or with a default device set, the same model as stock, through
the fast path.

Serving code often wraps everything, ``from_pretrained`` included, in inference mode. The
mode is thread-local, and a tensor made inside it is an *inference tensor*: it cannot be
updated in place outside the mode, so a model made of them cannot be trained. Which of a
loaded model's tensors are inference tensors therefore depends on which thread stock made
them on: every one on 4.x (the loading thread), none of the weights on 5.x when its loader
thread pool materialises them (the default), every one when it loads synchronously
(HF_DEACTIVATE_ASYNC_LOAD=1, quantising on the fly). parity.model_differences compares
``is_inference()`` of every tensor; these cases make it matter.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from safetensors.torch import load_file

import fasthug_patch
from tests.architectures import IS_V5, LEGACY_STATE_DICT_LOAD, get
from tests.parity import assert_same_pair, build_checkpoint, dtype_kwargs, load_pair
from tests.tiny import save_tiny_llama

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_mode")
    return {
        "bf16": save_tiny_llama(str(root / "bf16")),
        "fp32": save_tiny_llama(str(root / "fp32"), dtype=FP32),
        "sharded": save_tiny_llama(str(root / "sharded"), max_shard_size="20KB"),
        "bin": save_tiny_llama(str(root / "bin"), bin_format=True),
    }


def _load_in_inference_mode(path, expect_fast=True, **kwargs):
    with torch.inference_mode():
        pair = load_pair(transformers.AutoModelForCausalLM, path, **kwargs)
    assert pair.report is not None and pair.report.path == ("fast" if expect_fast else "fallback"), pair.report
    return pair


def _inputs():
    return {"input_ids": torch.arange(10).view(1, 10) % 128}


CASES = {
    # name: (checkpoint, from_pretrained kwargs)
    "zero-copy": ("bf16", dtype_kwargs(BF16)),
    "default-dtype": ("bf16", {}),  # 4.x: cast to fp32; 5.x: "auto", zero-copy
    "cast-down": ("fp32", dtype_kwargs(BF16)),
    "cast-up": ("bf16", dtype_kwargs(FP32)),
    "cast-fp16": ("bf16", dtype_kwargs(FP16)),
    "device-map-cpu": ("bf16", {"device_map": "cpu", **dtype_kwargs(BF16)}),
    "device-map-cpu-cast": ("fp32", {"device_map": "cpu", **dtype_kwargs(BF16)}),
    "sharded": ("sharded", dtype_kwargs(BF16)),
    "bin": ("bin", dtype_kwargs(BF16)),
    "bin-cast": ("bin", dtype_kwargs(FP32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_in_inference_mode_matches_stock(tiny, name):
    checkpoint, kwargs = CASES[name]
    # before 4.51 stock's own torch.load(mmap=True) reads .bin shards (test_sweep's EXPECTED_FALLBACKS)
    expect_fast = not (checkpoint == "bin" and LEGACY_STATE_DICT_LOAD)
    pair = _load_in_inference_mode(tiny[checkpoint], expect_fast, **kwargs)
    assert_same_pair(pair, _inputs(), context=f"inference mode, {name}")


@pytest.mark.parametrize("name", ["zero-copy", "cast-down", "cast-up"])
def test_load_in_inference_mode_without_the_loader_threads_matches_stock(tiny, name, monkeypatch):
    """5.x materialises on the loading thread when its async loading is off: then its
    tensors are inference tensors, where its thread pool's are not."""
    if not IS_V5:
        pytest.skip("HF_DEACTIVATE_ASYNC_LOAD is a 5.x switch")
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    checkpoint, kwargs = CASES[name]
    pair = _load_in_inference_mode(tiny[checkpoint], **kwargs)
    assert all(p.is_inference() for p in pair.stock.parameters()), "stock did not load on its own thread"
    assert_same_pair(pair, _inputs(), context=f"inference mode, synchronous, {name}")


def test_stock_weights_differ_between_the_lines_in_inference_mode(tiny):
    """What the cases above hold the fast path to: stock 4.x hands out inference tensors,
    stock 5.x's thread pool plain ones (a check that the comparison can tell them apart)."""
    with torch.inference_mode(), fasthug_patch.disabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny["bf16"], **dtype_kwargs(BF16))
    assert {p.is_inference() for p in model.parameters()} == {not IS_V5}


def test_moe_experts_fused_in_inference_mode(tmp_path):
    """5.x fuses Mixtral's experts with torch ops on the loading thread (inference tensors),
    while the tensors it assigns as read come from its thread pool (plain ones)."""
    arch = get("mixtral")
    path = build_checkpoint(arch, tmp_path / "mixtral", dtype=BF16)
    with torch.inference_mode():
        pair = load_pair(arch, path, **dtype_kwargs(BF16))
    assert pair.report.path == "fast", pair.report
    kinds = {p.is_inference() for p in pair.stock.parameters()}
    if IS_V5:
        assert kinds == {True, False}, "expected both fused (inference) and assigned (plain) weights"
    assert_same_pair(pair, arch.make_inputs(pair.stock.config), context="mixtral in inference mode")


def test_a_model_loaded_outside_inference_mode_can_be_trained(tiny):
    """The usual case keeps working: plain tensors, one optimiser step in place."""
    with fasthug_patch.enabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny["fp32"], **dtype_kwargs(BF16))
    assert not any(p.is_inference() for p in model.parameters())
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**_inputs(), labels=_inputs()["input_ids"]).loss.backward()
    optimiser.step()


# -- the hand-over itself -----------------------------------------------------------------------

def test_as_made_here_aliases_the_same_memory_as_the_wanted_kind():
    from fasthug_patch.thread_modes import as_made_here

    base = torch.arange(12, dtype=torch.float32)
    view = base[2:10].view(2, 4).t()  # an offset and non-contiguous strides
    with torch.inference_mode():
        made = as_made_here(view)
        assert as_made_here(made) is made  # already of the wanted kind
    assert made.is_inference() and not view.is_inference()
    assert (made.data_ptr(), made.shape, made.stride(), made.dtype) == (view.data_ptr(), view.shape,
                                                                        view.stride(), view.dtype)
    base[2] = 100.0
    assert made[0, 0].item() == 100.0  # no copy: the same bytes
    back = as_made_here(made)  # outside the mode: a plain alias again
    assert not back.is_inference() and back.data_ptr() == view.data_ptr()
    assert as_made_here(view) is view


def test_as_made_here_refuses_a_tensor_subclass_it_would_strip():
    from fasthug_patch.errors import FastPathError
    from fasthug_patch.thread_modes import as_made_here

    param = torch.nn.Parameter(torch.zeros(3))
    with torch.inference_mode(), pytest.raises(FastPathError, match="Parameter"):
        as_made_here(param)


@pytest.mark.parametrize("mode", ["inference_mode", "default_device"])
def test_the_engine_makes_plain_cpu_tensors_whatever_the_callers_modes(tiny, mode):
    """Its reader threads write into what submit allocates: an inference tensor there could
    not be written outside the mode, and a tensor on the caller's default device (meta here,
    a stand-in for `with torch.device("cuda")`) would not be the CPU tensor asked for."""
    from fasthug_patch.engine import Materializer
    from fasthug_patch.plan import CheckpointIndex

    path = f"{tiny['bf16']}/model.safetensors"
    refs = CheckpointIndex().tensors([path])
    engine = Materializer(2, 1 << 20, None)
    try:
        with torch.inference_mode() if mode == "inference_mode" else torch.device("meta"):
            engine.prepare([path])
            assert engine.cast_ahead(list(refs.values()), FP32)  # casts started on this thread
            engine.map_ahead(list(refs.values()))
            results = [engine.submit(ref, dtype).result() for ref in refs.values() for dtype in (BF16, FP32, FP16)]
        assert results and not any(t.is_inference() for t in results)
        assert all(t.device.type == "cpu" for t in results)
        expected = {name: t for name, t in load_file(path).items()}
        for ref, (bf16, fp32, fp16) in zip(refs.values(), zip(*[iter(results)] * 3)):
            assert torch.equal(bf16, expected[ref.name]) and torch.equal(fp32, expected[ref.name].float())
            assert torch.equal(fp16, expected[ref.name].half())
    finally:
        engine.close()


# -- torch modes of the caller ------------------------------------------------------------------

def _doubling_mode():
    """A dispatch mode that changes what a copy makes (doubles every floating result)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Doubling(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.is_floating_point():
                out.mul_(2)
            return out

    return Doubling()


def _counting_mode():
    from torch.overrides import TorchFunctionMode

    class Counting(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return Counting()


@pytest.mark.parametrize("mode", ["dispatch", "function"])
def test_a_load_under_a_torch_mode_goes_to_stock(tiny, mode):
    """Stock runs its loading ops under the caller's mode (4.x every one, 5.x its conversions
    and synchronous loads); the engine's threads would not, so such a load is stock's."""
    make = _doubling_mode if mode == "dispatch" else _counting_mode
    with make():
        pair = load_pair(transformers.AutoModelForCausalLM, tiny["fp32"], **dtype_kwargs(BF16))
    assert pair.report.path == "fallback" and "is active where from_pretrained was called" in pair.report.reason
    assert ("Doubling" if mode == "dispatch" else "Counting") in pair.report.reason
    assert_same_pair(pair, _inputs(), context=f"under a {mode} mode")


def test_a_default_device_is_not_a_mode_that_sends_the_load_to_stock(tiny):
    with torch.device("cpu"):
        pair = load_pair(transformers.AutoModelForCausalLM, tiny["fp32"], **dtype_kwargs(BF16))
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, _inputs(), context="inside torch.device('cpu')")
