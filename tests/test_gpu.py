"""On a CUDA machine: loads to the GPU through the pinned ring are stock's model, bit for bit.

Skipped where there is no GPU (CI); the ring's logic runs on every machine in
tests/test_streaming.py with the CPU stand-in device. Run on a lent GPU machine with
``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import fasthug_patch
from fasthug_patch import capabilities, device_move
from tests.architectures import catalogue, get, representative
from tests.parity import (
    assert_matches_stock,
    assert_same_model,
    build_checkpoint,
    checkpoint_builder,
    dtype_kwargs,
    edit_safetensors,
    load_both,
    load_model,
    load_pair,
    report_path,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_ARCHES = [a for a in catalogue() if a.supported()]
# Whether device_map="cuda" streams on this line (5.x; 4.57 once FASTHUG_UNVERIFIED_GPU=1,
# which scripts/gpu_quant.sh sets to check it), as the capability table says.
STREAMS_CUDA = capabilities.decide(capabilities.Facts(transformers_version=transformers.__version__,
                                                      device_kinds=frozenset({"cuda"})), "call").fast
needs_streaming = pytest.mark.skipif(not STREAMS_CUDA, reason="device_map='cuda' loads stock on this line")


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield


@pytest.fixture(scope="module")
def fp32_checkpoints(tmp_path_factory):
    return checkpoint_builder(tmp_path_factory.mktemp("gpu_ckpts"))


@needs_streaming
@pytest.mark.parametrize("entry", GPU_ARCHES, ids=lambda a: a.name)
def test_device_map_cuda_matches_stock(entry, fp32_checkpoints):
    outcome = load_both(entry, fp32_checkpoints(entry), device_map="cuda")
    assert_matches_stock(outcome, context=f"{entry.name} device_map=cuda")
    if outcome.fast is not None:
        assert next(outcome.fast.parameters()).device.type == "cuda"


@needs_streaming
def test_most_architectures_stream_to_the_gpu(fp32_checkpoints):
    fast = []
    for entry in GPU_ARCHES:
        with fasthug_patch.enabled():
            load_model(entry, fp32_checkpoints(entry), device_map="cuda")
            report = fasthug_patch.last_report()
        fast.append(report.path == "fast" and report.tensors_to_device > 0)
    assert sum(fast) >= 0.9 * len(fast), f"{sum(fast)}/{len(fast)} streamed"


@needs_streaming
@pytest.mark.parametrize("name", [entry.name for entry in representative()])
@pytest.mark.parametrize("checkpoint_dtype, load_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16),
])
def test_casts_on_the_gpu_match_stocks_cpu_casts(name, checkpoint_dtype, load_dtype, fp32_checkpoints):
    entry = get(name)
    pair = load_pair(entry, fp32_checkpoints(entry, checkpoint_dtype), device_map="cuda", **dtype_kwargs(load_dtype))
    assert_same_model(pair.stock, pair.fast, entry.make_inputs(pair.stock.config), context=f"{name} {load_dtype}")
    assert report_path(pair.report) == "fast"


@needs_streaming
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0"])  # 4.57 casts on the CPU for the first, the GPU for the second
def test_nan_payloads_match_stock_after_a_gpu_cast(tmp_path, device_map):
    entry = get("llama")
    path = build_checkpoint(entry, tmp_path / "nan", torch.float32)

    from safetensors.torch import load_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    poisoned = tensors[name].clone()
    bits = poisoned.view(-1).view(torch.int32)
    bits[0] = 0x7FC00001  # NaN with a payload
    bits[1] = -0x00400001  # negative NaN with another payload (0xFFBFFFFF)
    poisoned.view(-1)[2] = float("nan")
    edit_safetensors(file, drop=[name], add={name: poisoned})
    for dtype in (torch.bfloat16, torch.float16):
        pair = load_pair(entry, path, device_map=device_map, **dtype_kwargs(dtype))
        assert_same_model(pair.stock, pair.fast, context=f"NaN {dtype} {device_map}")
        assert report_path(pair.report) == "fast"


@needs_streaming
@pytest.mark.parametrize("device_map", ["auto", "cuda:0", 0, "split"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_device_map_forms(device_map, dtype, fp32_checkpoints):
    entry = get("llama")
    path = fp32_checkpoints(entry)
    if device_map == "split":  # embeddings, the first layer and the head on the GPU, the rest on the CPU
        device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                      "model.rotary_emb": "cpu", "lm_head": 0}
    pair = load_pair(entry, path, device_map=device_map, **(dtype_kwargs(dtype) if dtype else {}))
    assert_same_model(pair.stock, pair.fast, context=f"device_map={device_map} dtype={dtype}")
    assert report_path(pair.report) == "fast"


@needs_streaming
@pytest.mark.parametrize("modes", ["device context", "default device", "inference mode", "both"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_loads_under_the_callers_modes_match_stock(modes, dtype, fp32_checkpoints):
    """`with torch.device("cuda"):` (stock turns it into device_map={"": device}),
    torch.set_default_device and torch.inference_mode() around from_pretrained: the engine
    allocates its CPU-side buffers on the CPU and hands over stock's kind of tensor
    (fasthug_patch/thread_modes.py; tests/test_thread_modes.py runs the logic on the CPU)."""
    import contextlib

    entry = get("llama")
    path = fp32_checkpoints(entry)
    context = contextlib.ExitStack()
    if modes in ("device context", "both"):
        context.enter_context(torch.device("cuda"))
    if modes in ("inference mode", "both"):
        context.enter_context(torch.inference_mode())
    if modes == "default device":
        torch.set_default_device("cuda")
        context.callback(torch.set_default_device, None)
    with context:
        pair = load_pair(entry, path, **(dtype_kwargs(dtype) if dtype else {}))
    assert_same_model(pair.stock, pair.fast, context=f"{modes} dtype={dtype}")
    assert next(pair.fast.parameters()).device.type == "cuda"
    assert report_path(pair.report) == "fast"


@pytest.mark.parametrize("name", [entry.name for entry in representative()])
@pytest.mark.parametrize("how", ["cuda()", "to('cuda')", "to(device=cuda:0)"])
def test_model_cuda_after_a_cpu_load_streams_and_matches_stock(name, how, fp32_checkpoints):
    entry = get(name)
    path = fp32_checkpoints(entry)
    move = {
        "cuda()": lambda m: m.cuda(),
        "to('cuda')": lambda m: m.to("cuda"),
        "to(device=cuda:0)": lambda m: m.to(device=torch.device("cuda", 0)),
    }[how]
    with fasthug_patch.disabled():
        stock = move(load_model(entry, path)[0])
    with fasthug_patch.enabled():
        fast = load_model(entry, path)[0]
        assert device_move.was_fast_loaded(fast)
        before = device_move.moves_streamed
        assert move(fast) is fast
        assert device_move.moves_streamed == before + 1
    assert_same_model(stock, fast, entry.make_inputs(stock.config), context=f"{name} {how}")


def test_model_to_with_a_dtype_is_left_to_torch(fp32_checkpoints):
    entry = get("llama")
    with fasthug_patch.enabled():
        fast = load_model(entry, fp32_checkpoints(entry))[0]
        before = device_move.moves_streamed
        fast.to("cuda", torch.bfloat16)
        assert device_move.moves_streamed == before
    assert next(fast.parameters()).dtype == torch.bfloat16


def _peak_load(entry, path) -> tuple[int, int]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(entry, path, device_map="cuda")[0] if STREAMS_CUDA else load_model(entry, path)[0].cuda()
    torch.cuda.synchronize()
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    del model
    return torch.cuda.max_memory_allocated(), weights


def test_peak_gpu_memory_is_the_model_plus_the_ring(tmp_path):
    """Beyond the model the fast path allocates only the ring's device scratch (casts);
    5.x's own caching-allocator warm-up is stock's and counts on both sides."""
    entry = get("llama")
    path = build_checkpoint(entry, tmp_path / "peak", torch.bfloat16)
    from fasthug_patch.engine import devices, ring

    with fasthug_patch.disabled():
        stock_peak, weights = _peak_load(entry, path)
    with fasthug_patch.enabled():
        _peak_load(entry, path)  # the ring exists from here on
        fast_peak, _ = _peak_load(entry, path)
    staging = ring.shared_ring(devices.backend_for("cuda:0"))
    assert fast_peak <= max(stock_peak, weights) + staging.slots * staging.slot_bytes, (fast_peak, stock_peak, weights)
