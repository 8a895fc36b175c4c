"""4.57 with a GPU target: each tensor goes where stock's shard loop puts it, cast where
stock casts it. The CUDA parts run in tests/test_gpu.py; here, on every machine, the
decisions: which device stock reads a shard on (checked against stock's own function),
and which device and cast place the v4 adapter asks of the engine for each tensor."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
import transformers

from fasthug_patch.adapters.v4 import V4Adapter, stock_tensor_device
from fasthug_patch.capabilities import V4_STREAMED_FROM, version_tuple
from fasthug_patch.errors import FastPathError
from fasthug_patch.plan import TensorRef

DEVICE_MAPS = {
    "none": None,
    "cpu string": {"": "cpu"},
    "cpu device": {"": torch.device("cpu")},
    "cuda (no index)": {"": torch.device("cuda")},  # from_pretrained(device_map="cuda")
    "cuda:0": {"": torch.device("cuda:0")},  # device_map="cuda:0"
    "int": {"": 0},  # device_map=0
    "string cuda:1": {"": "cuda:1"},  # a dict the user wrote
    "per module": {"model": 0, "lm_head": "cpu"},  # "auto", expanded
}


class _OpenedOn(Exception):
    pass


@pytest.mark.skipif(version_tuple(transformers.__version__)[:1] != (4,)
                    or version_tuple(transformers.__version__) < V4_STREAMED_FROM,
                    reason="stock's 4.57 shard loop is what the mirror copies")
@pytest.mark.parametrize("device_map", DEVICE_MAPS.values(), ids=DEVICE_MAPS.keys())
def test_the_read_device_is_the_one_stock_opens_the_shard_on(device_map, monkeypatch):
    from transformers import modeling_utils

    def safe_open(path, framework, device="cpu"):
        raise _OpenedOn(device)

    monkeypatch.setattr(modeling_utils, "safe_open", safe_open)
    with pytest.raises(_OpenedOn) as opened:
        modeling_utils._load_state_dict_into_meta_model(None, {}, "shard.safetensors", {}, device_map=device_map)
    stock = opened.value.args[0]
    mirror = stock_tensor_device(device_map)
    # safe_open reads a None device as the CPU (the next test)
    assert str(mirror) == str("cpu" if stock is None else stock)


def test_safe_open_reads_a_none_device_as_the_cpu(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    with safe_open(str(tmp_path / "m.safetensors"), "pt", device=None) as handle:
        assert handle.get_slice("w")[...].device.type == "cpu"


def _place(device_map, quantised=()):
    """Runs the adapter's placement of one shard with an engine that records what it is
    asked; returns (requests, quantizer calls)."""
    requests, placed = [], []

    class Engine:
        def submit(self, source, dtype, device, stock_casts_on_device=False):
            requests.append((source, str(device), stock_casts_on_device))
            future: Future = Future()
            future.set_result(source)
            return future

    class Quantizer:
        pre_quantized = True

        def param_needs_quantization(self, model, name):
            return name in quantised

        def create_quantized_param(self, model, value, name, device):
            placed.append((name, str(device)))

    utils = SimpleNamespace(_infer_parameter_dtype=lambda *args: (True, torch.bfloat16),
                            _load_parameter_into_model=lambda model, name, tensor: None)
    adapter = V4Adapter(SimpleNamespace(__version__="4.57.6"), utils)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "lm_head.weight"]
    call = SimpleNamespace(materializer=Engine(), index=SimpleNamespace(check_unchanged=lambda files: None))
    shard = {"model": torch.nn.Module(), "state_dict": dict.fromkeys(names), "shard_file": "s.safetensors",
             "hf_quantizer": Quantizer() if quantised else None, "device_map": device_map}
    adapter._load_shard(call, shard, [(name, name) for name in names])
    return requests, placed


@pytest.mark.parametrize("device_map, device, on_device", [
    (None, "cpu", False),
    ({"": torch.device("cuda")}, "cuda", False),  # stock casts on the CPU, then copies
    ({"": torch.device("cuda:0")}, "cuda:0", True),  # stock reads the shard on the GPU and casts there
    ({"": 0}, "0", True),
])
def test_every_tensor_goes_to_stocks_device_cast_where_stock_casts(device_map, device, on_device):
    requests, _ = _place(device_map)
    assert [(device, on_device)] * 3 == [(d, flag) for _, d, flag in requests]


def test_a_split_device_map_sends_each_tensor_to_its_modules_device():
    requests, _ = _place({"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu"})
    assert requests == [("model.embed_tokens.weight", "0", False), ("model.layers.0.mlp.weight", "cuda:1", False),
                        ("lm_head.weight", "cpu", False)]


def test_a_module_moved_back_to_the_cpu_after_a_gpu_read_is_left_to_stock():
    with pytest.raises(FastPathError, match="lm_head.weight: stock reads it on cuda:0"):
        _place({"": "cuda:0", "lm_head": "cpu"})


def test_a_quantised_tensor_reaches_the_quantizer_as_stock_reads_it():
    """Stock hands create_quantized_param the tensor as read (on the shard's read device)
    with the module's device beside it."""
    requests, placed = _place({"": torch.device("cuda")}, quantised={"model.layers.0.mlp.weight"})
    assert ("model.layers.0.mlp.weight", "cpu", False) in requests
    assert placed == [("model.layers.0.mlp.weight", "cuda")]
    requests, placed = _place({"": 0}, quantised={"model.layers.0.mlp.weight"})
    assert ("model.layers.0.mlp.weight", "0", True) in requests
    assert placed == [("model.layers.0.mlp.weight", "0")]


@pytest.mark.parametrize("device_map, cast", [(None, True), ({"": 0}, False)], ids=["cast-on-cpu", "read-on-gpu"])
def test_weights_quantised_on_the_fly_are_read_a_bounded_way_ahead_of_the_quantizer(monkeypatch, device_map, cast):
    """4.57 quantises from float16: each bf16 weight is cast first; with a GPU it reads on,
    each weight is copied there first. Either way the copies start a little ahead of the
    quantizer (so the two overlap) but never more than QUANTISE_AHEAD_BYTES ahead, and each
    weight reaches create_quantized_param in stock's order."""
    from fasthug_patch.adapters import v4

    monkeypatch.setattr(v4.lookahead, "QUANTISE_AHEAD_BYTES", 3 * 64 * 64 * 2)  # three weights' float16 copies
    events = []

    class Engine:
        files = SimpleNamespace(release_view=lambda tensor: False)

        def submit(self, source, dtype, device, stock_casts_on_device=False):
            events.append(("cast", source.name))
            future: Future = Future()
            future.set_result(torch.zeros(source.shape, dtype=dtype))
            return future

    class Quantizer:
        pre_quantized = False

        def param_needs_quantization(self, model, name):
            return True

        def create_quantized_param(self, model, value, name, device):
            events.append(("quantise", name))

    refs = [TensorRef("m.safetensors", f"w{i}", "F16", (64, 64), 0, 64 * 64 * 2) for i in range(8)]
    monkeypatch.setattr(v4, "needs_cast", lambda source, dtype: cast)
    utils = SimpleNamespace(_infer_parameter_dtype=lambda *args: (True, torch.float16),
                            _load_parameter_into_model=lambda model, name, tensor: None)
    adapter = V4Adapter(SimpleNamespace(__version__="4.57.6"), utils)
    model = torch.nn.Module()
    call = SimpleNamespace(materializer=Engine(), index=SimpleNamespace(check_unchanged=lambda files: None))
    shard = {"model": model, "state_dict": {ref.name: None for ref in refs}, "shard_file": "s.safetensors",
             "hf_quantizer": Quantizer(), "device_map": device_map}
    adapter._load_shard(call, shard, [(ref.name, ref) for ref in refs])
    assert [name for kind, name in events if kind == "quantise"] == [ref.name for ref in refs]
    assert sorted(name for kind, name in events if kind == "cast") == sorted(ref.name for ref in refs)
    for index, (kind, name) in enumerate(events):  # the one being quantised, and at most three more
        casts = sum(1 for k, _ in events[: index + 1] if k == "cast")
        quantised = sum(1 for k, _ in events[: index + 1] if k == "quantise")
        assert casts - quantised <= 4, events
    assert events[:3] == [("cast", "w0"), ("cast", "w1"), ("cast", "w2")], events  # it did read ahead
