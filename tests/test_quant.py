"""bitsandbytes through the fast path: the piecewise kernels against the whole ops, and
whole loads (8-bit, 4-bit nf4/fp4, double quant, storage dtypes, skip modules) against stock."""

from __future__ import annotations

import pytest
import torch
import transformers

import fasthug_patch
from fasthug_patch import capabilities, quant
from fasthug_patch.capabilities import Facts
from tests.architectures import get
from tests.parity import (
    assert_matches_stock,
    assert_same_model,
    assert_same_pair,
    checkpoint_builder,
    dtype_kwargs,
    load_both,
    load_pair,
)
from tests.tiny import tiny_llama_config

bnb = pytest.importorskip("bitsandbytes")
IS_V5 = capabilities.adapter_line(transformers.__version__) == "v5"
needs_v5 = pytest.mark.skipif(not IS_V5, reason="the fast path quantises on transformers 5.x")
# Lines whose fast path handles bitsandbytes (on the fly and pre-quantised): 4.57 and 5.x.
BNB_LINE = capabilities.version_tuple(transformers.__version__) >= capabilities.PREQUANTISED_FROM
needs_bnb_line = pytest.mark.skipif(not BNB_LINE, reason="the fast path handles bitsandbytes from 4.57")
needs_verified_bnb = pytest.mark.skipif(not quant.bnb_verified(quant.bnb_version()),
                                        reason=f"bitsandbytes {quant.bnb_version()} is not a verified release")


@pytest.fixture()
def small_pieces(monkeypatch):
    """Pieces of 256 elements, so that small tensors are split too; counts the pieces run."""
    monkeypatch.setattr(quant, "INT8_PIECE_ELEMENTS", 256)
    monkeypatch.setattr(quant, "FOUR_BIT_PIECE_ELEMENTS", 256)
    counts = {"pieces": 0, "fast_4bit": 0}
    run_pieces, piece_4bit = quant._run_pieces, quant._4bit_piece

    def counting_run(job, starts):
        starts = list(starts)
        counts["pieces"] += len(starts)
        return run_pieces(job, starts)

    def counting_4bit(*args):
        result = piece_4bit(*args)
        counts["fast_4bit"] += result is not None
        return result

    monkeypatch.setattr(quant, "_run_pieces", counting_run)
    monkeypatch.setattr(quant, "_4bit_piece", counting_4bit)
    return counts


@pytest.fixture()
def joined(monkeypatch):
    """One entry per quantize op answered piecewise: True where the pieces were joined, False
    where they gave up (a piece failed or the op was not split) and the whole op ran."""
    outcomes = []
    for op, pieces in list(quant._PIECEWISE.items()):
        def counting(*args, _pieces=pieces, **kwargs):
            result = _pieces(*args, **kwargs)
            outcomes.append(result is not None)
            return result
        monkeypatch.setitem(quant._PIECEWISE, op, counting)
    return outcomes


def _awkward(shape, dtype, seed=0) -> torch.Tensor:
    """Random weights with the values that break sloppy kernels: all-zero rows and blocks,
    values exactly on the 4-bit bucket bounds and at +-absmax, subnormals, signed zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    flat[: shape[-1]] = 0.0  # a zero row (and zero 4-bit blocks)
    flat[shape[-1] : shape[-1] + 64] = -0.0
    nf4_code = bnb.functional.get_4bit_type("nf4", device="cpu")
    mids = (nf4_code[1:] + nf4_code[:-1]) / 2
    flat[200 : 200 + mids.numel()] = mids * 0.5  # on the bounds once scaled by an absmax of 0.5
    flat[199] = 0.5
    flat[300:310] = 1e-41  # subnormal in fp32
    return w.to(dtype)


def _state_tensors(state) -> dict:
    out = {}
    for key, value in state.as_dict(packed=False).items():
        out[key] = value
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.view(torch.uint8) if a.dtype.is_floating_point and a.dim() else a,
            b.view(torch.uint8) if b.dtype.is_floating_point and b.dim() else b) and (
            a.dim() or torch.equal(a, b) or (torch.isnan(a) & torch.isnan(b)).all())
    return a == b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("double", [False, True])
def test_4bit_pieces_equal_the_whole_op(small_pieces, dtype, quant_type, storage, double):
    for shape in [(48, 96), (33, 64), (7, 1000)]:  # whole blocks; a partial last block; odd rows
        w = _awkward(shape, dtype)
        kwargs = dict(blocksize=64, compress_statistics=double, quant_type=quant_type, quant_storage=storage)
        whole, whole_state = bnb.functional.quantize_4bit(w, **kwargs)
        with quant.chunked_kernels():
            pieces, pieces_state = bnb.functional.quantize_4bit(w, **kwargs)
        assert _same(whole, pieces), (shape, "packed data")
        a, b = _state_tensors(whole_state), _state_tensors(pieces_state)
        assert a.keys() == b.keys()
        for key in a:
            assert _same(a[key], b[key]), (shape, key)
    assert small_pieces["pieces"] > 0 and small_pieces["fast_4bit"] > 0  # the piecewise kernel ran


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_4bit_pieces_for_every_blocksize(small_pieces, blocksize):
    w = _awkward((64, 512), torch.bfloat16, seed=blocksize)
    whole = torch.ops.bitsandbytes.quantize_4bit.default(w, blocksize, "nf4", torch.uint8)
    with quant.chunked_kernels():
        pieces = torch.ops.bitsandbytes.quantize_4bit.default(w, blocksize, "nf4", torch.uint8)
    assert torch.equal(whole[0], pieces[0]) and torch.equal(whole[1], pieces[1])


def test_4bit_nan_and_inf_blocks_go_to_the_op(small_pieces):
    """NaN compares false with every bound, where bucketize puts it last: such a piece is
    left to the op, and the result is still the whole op's."""
    w = _awkward((64, 256), torch.float32)
    w[3, 5], w[40, 7] = float("nan"), float("inf")
    whole = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    with quant.chunked_kernels():
        pieces = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    assert torch.equal(whole[0], pieces[0])
    assert torch.equal(whole[1].nan_to_num(), pieces[1].nan_to_num())
    assert small_pieces["fast_4bit"] > 0  # the clean pieces still took the fast kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 32), (37, 96), (512, 8)])
def test_int8_pieces_equal_the_whole_op(small_pieces, dtype, shape):
    w = _awkward(shape, dtype)
    whole = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")
    with quant.chunked_kernels():
        pieces = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")
    assert torch.equal(whole.data, pieces.data) and torch.equal(whole.CB, pieces.CB)
    assert torch.equal(whole.SCB, pieces.SCB) and pieces.data.data_ptr() == pieces.CB.data_ptr()
    assert small_pieces["pieces"] > 0


def test_int8_pieces_allocate_on_the_cpu_under_a_callers_default_device(small_pieces, joined):
    """A default device the caller set (meta, a stand-in for `with torch.device("cuda")`)
    does not move the pieces' output off the CPU, where the whole op makes it (torch turns
    function modes such as the default device off inside a dispatch mode's handler)."""
    w = _awkward((64, 32), torch.float16)
    op = torch.ops.bitsandbytes.int8_vectorwise_quant.default
    whole = op(w, 0.0)
    with torch.device("meta"), quant.chunked_kernels():
        pieces = op(w, 0.0)
    assert joined == [True]  # joined from the pieces, not left to the whole op
    assert pieces[0].device.type == "cpu" and torch.equal(whole[0], pieces[0]) and torch.equal(whole[1], pieces[1])


def test_int8_with_an_outlier_threshold_is_left_whole(small_pieces):
    w = _awkward((64, 64), torch.float16)
    w[5, 9] = 9.0
    whole = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w.clone(), 6.0)
    with quant.chunked_kernels():
        pieces = torch.ops.bitsandbytes.int8_vectorwise_quant.default(w.clone(), 6.0)
    assert all(torch.equal(a, b) for a, b in zip(whole, pieces))
    assert small_pieces["pieces"] == 0  # looks across rows: never split


def test_a_failing_piece_runs_the_whole_op(small_pieces, monkeypatch):
    def broken(*args):
        raise RuntimeError("simulated piece failure")

    monkeypatch.setattr(quant, "_4bit_piece", broken)
    w = _awkward((64, 256), torch.bfloat16)
    whole = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    with quant.chunked_kernels():
        pieces = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)
    assert torch.equal(whole[0], pieces[0]) and torch.equal(whole[1], pieces[1])


def test_the_mode_is_thread_local():
    import threading

    seen = []
    with quant.chunked_kernels():
        thread = threading.Thread(target=lambda: seen.append(torch._C._get_dispatch_mode_stack_len()
                                                             if hasattr(torch._C, "_get_dispatch_mode_stack_len")
                                                             else len(torch.utils._python_dispatch._get_current_dispatch_mode_stack())))
        thread.start()
        thread.join()
    assert seen == [0]


def _quant_threads():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("fasthug-quant")]


def test_the_quantize_pool_lives_as_long_as_its_holders():
    """One pool for all holders at once, gone with the last: its idle threads would keep
    OpenMP teams that slow the user's model down afterwards (quant.quantize_pool)."""
    assert not _quant_threads()
    with quant.quantize_pool() as outer:
        with quant.quantize_pool() as inner:
            assert inner is outer
            assert outer.submit(lambda: 7).result() == 7
        assert _quant_threads()  # the outer holder keeps it
    assert not _quant_threads()
    with pytest.raises(RuntimeError):
        outer.submit(lambda: 7)  # shut down
    assert quant._run_pieces(lambda start: start, range(3)) == [0, 1, 2]  # alone: a pool for that op only
    assert not _quant_threads()


def test_inputs_are_released_after_convert_unless_the_result_shares_them():
    released = []
    source, kept = torch.ones(8), torch.zeros(8)

    def convert(input_dict, **kwargs):
        return {"a": source * 2, "b": kept}

    wrapped = quant.with_chunked_kernels(convert, released.append)
    wrapped({"a": [source], "b": [kept[:4]]}, model=None)
    assert [t is source for t in released] == [True]  # kept[:4] shares the result's memory

    def failing(input_dict, **kwargs):
        raise ValueError("stock's error")

    with pytest.raises(ValueError, match="stock's error"):
        quant.with_chunked_kernels(failing, released.append)({"a": [source]})
    assert len(released) == 1  # nothing released when the op fails: stock retries from the same bytes


# -- whole loads -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bnb") / "llama")
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.bfloat16))
    model.save_pretrained(path)
    return path


def _bnb_attributes(model) -> dict:
    """What state_dict() leaves out of a quantised parameter."""
    out = {}
    for name, param in model.named_parameters():
        if isinstance(param, bnb.nn.Params4bit):
            out[name] = (param.blocksize, param.quant_type, param.quant_storage, param.compress_statistics,
                         param.bnb_quantized, sorted(_state_tensors(param.quant_state)))
        elif isinstance(param, bnb.nn.Int8Params):
            cb, scb = param.CB, param.SCB
            out[name] = (param.has_fp16_weights, None if cb is None else cb.data_ptr() == param.data.data_ptr(),
                         None if scb is None else (scb.dtype, tuple(scb.shape)))
    return out


CONFIGS = {
    "int8": dict(load_in_8bit=True),
    "int8-skip": dict(load_in_8bit=True, llm_int8_skip_modules=["o_proj"], llm_int8_threshold=4.0),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-storage": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_quant_storage=torch.bfloat16),
}


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantised_load_matches_stock(llama_bf16, small_pieces, name):
    config = transformers.BitsAndBytesConfig(**CONFIGS[name])
    pair = load_pair(transformers.AutoModelForCausalLM, llama_bf16, quantization_config=config, device_map="cpu")
    assert pair.report is not None and pair.report.path == "fast", pair.report
    assert small_pieces["pieces"] > 0  # quantised in pieces, not by the whole op
    inputs = {"input_ids": torch.arange(12).view(1, 12) % 128}
    assert_same_pair(pair, inputs, context=name)
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)
    assert _bnb_attributes(pair.fast), "nothing was quantised"


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0"])  # 4.57 reads the weights on the CPU, then the GPU
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantised_load_to_the_gpu_matches_stock(llama_bf16, name, device_map):
    """Quantising on the fly to a GPU: stock's quantize op (5.x) or create_quantized_param
    (4.57) and bitsandbytes' CUDA kernels on the bytes stock would hand them, read ahead
    within a budget. Taken only with FASTHUG_UNVERIFIED_GPU=1 until this has passed on a GPU
    (scripts/gpu_quant.sh)."""
    config = transformers.BitsAndBytesConfig(**CONFIGS[name])
    pair = load_pair(transformers.AutoModelForCausalLM, llama_bf16, quantization_config=config, device_map=device_map)
    if capabilities.gpu_path_allowed("bnb-on-the-fly-cuda"):
        assert pair.report.path == "fast", pair.report
    else:
        assert pair.report.path == "fallback" and "FASTHUG_UNVERIFIED_GPU" in pair.report.reason, pair.report
    inputs = {"input_ids": torch.arange(8).view(1, 8).cuda()}
    assert_same_pair(pair, inputs, context=f"{name} on the fly to {device_map}")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)
    assert _bnb_attributes(pair.fast), "nothing was quantised"


@needs_bnb_line
@needs_verified_bnb
def test_quantised_sources_leave_the_process(llama_bf16, monkeypatch):
    """Each weight's checkpoint pages are unmapped once it is quantised: the release is
    asked for every quantised Linear and finds its mapped view (the checkpoint's dtype, so
    that the weights are views: 4.57 would otherwise cast them to its bitsandbytes default,
    float16, and the cast releases its source pages itself)."""
    from fasthug_patch.engine.mapped import MappedFiles

    found = []
    release = MappedFiles.release_view
    monkeypatch.setattr(MappedFiles, "release_view", lambda self, t: found.append(release(self, t)) or found[-1])
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with fasthug_patch.enabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(llama_bf16, quantization_config=config,
                                                                  device_map="cpu", **dtype_kwargs(torch.bfloat16))
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert quantised and found == [True] * len(quantised)


@needs_bnb_line
@needs_verified_bnb
def test_no_quantize_threads_outlive_the_load(llama_bf16, small_pieces, monkeypatch):
    """The pieces run on the load's quantize workers, and those are gone when
    from_pretrained returns; a failed load leaves none either."""
    ran_on = set()
    int8_rows = quant.int8_rows_in_pieces

    def recording(func, A, threshold=0.0):
        ran_on.update(t.name for t in _quant_threads())
        return int8_rows(func, A, threshold)

    monkeypatch.setitem(quant._PIECEWISE, next(k for k, v in quant._PIECEWISE.items() if v is int8_rows), recording)
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with fasthug_patch.enabled():
        transformers.AutoModelForCausalLM.from_pretrained(llama_bf16, quantization_config=config, device_map="cpu")
        assert fasthug_patch.last_report().path == "fast"
    assert small_pieces["pieces"] > 0 and ran_on  # the pool was up while the weights were quantised
    assert not _quant_threads()


@needs_bnb_line
@needs_verified_bnb
def test_quantised_load_with_a_cast(llama_bf16, small_pieces):
    """dtype=float16 over a bf16 checkpoint: the quantised weights are cast on demand."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    pair = load_pair(transformers.AutoModelForCausalLM, llama_bf16, quantization_config=config, device_map="cpu",
                     **dtype_kwargs(torch.float16))
    assert pair.report.path == "fast"
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context="nf4 fp16")


@pytest.fixture(scope="module")
def prequantised(llama_bf16, tmp_path_factory):
    """save_pretrained of stock's int8 and nf4 (double-quantised, bf16 compute) models."""
    out = {}
    for name in ("int8", "nf4-double-bf16"):
        config = transformers.BitsAndBytesConfig(**CONFIGS[name])
        with fasthug_patch.disabled():
            model = transformers.AutoModelForCausalLM.from_pretrained(llama_bf16, quantization_config=config,
                                                                      device_map="cpu")
        out[name] = str(tmp_path_factory.mktemp("prequantised") / name)
        model.save_pretrained(out[name])
    return out


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.parametrize("name", ["int8", "nf4-double-bf16"])
def test_quantised_checkpoint_loads_as_stock(prequantised, name):
    """A pre-quantised checkpoint: weights, SCB and quant_state placed as they are, no
    re-quantisation (5.x, and 4.57 through the quantizer's create_quantized_param)."""
    pair = load_pair(transformers.AutoModelForCausalLM, prequantised[name], device_map="cpu")
    assert pair.report.path == "fast", pair.report
    assert pair.report.tensors_mapped > 0  # the quantised bytes were handed over zero-copy
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context=f"pre-quantised {name}")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)
    assert _bnb_attributes(pair.fast), "nothing was quantised"


@needs_bnb_line
@needs_verified_bnb
def test_quantised_checkpoint_through_a_model_class(prequantised):
    """Without an Auto class the config is read inside from_pretrained: the load stage
    learns that the checkpoint is pre-quantised and still takes the fast path."""
    cls = transformers.LlamaForCausalLM
    pair = load_pair(cls, prequantised["int8"], device_map="cpu")
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context="pre-quantised int8, model class")


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.parametrize("name", ["int8", "nf4-double-bf16"])
def test_quantised_checkpoint_given_a_quantization_config(prequantised, name):
    """quantization_config passed with a pre-quantised checkpoint, through a model class (no
    config at the call): stock keeps the checkpoint's own config and loads it pre-quantised,
    and so does the fast path, once the load stage knows."""
    config = transformers.BitsAndBytesConfig(**CONFIGS[name])
    pair = load_pair(transformers.LlamaForCausalLM, prequantised[name], quantization_config=config,
                     device_map="cpu")
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context=f"pre-quantised {name}, config given")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0"])  # 4.57 reads the shard on the CPU, then on the GPU
@pytest.mark.parametrize("name", ["int8", "nf4-double-bf16"])
def test_quantised_checkpoint_on_the_gpu_loads_as_stock(prequantised, name, device_map):
    """A pre-quantised checkpoint bound for a GPU: its tensors reach the quantizer's own
    code where and as stock's do. Taken only with FASTHUG_UNVERIFIED_GPU=1 until this has
    passed on a GPU (scripts/gpu_quant.sh); without it the load is stock's, saying why."""
    pair = load_pair(transformers.AutoModelForCausalLM, prequantised[name], device_map=device_map)
    if capabilities.gpu_path_allowed("bnb-prequantised-cuda"):
        assert pair.report.path == "fast", pair.report
    else:
        assert pair.report.path == "fallback" and "FASTHUG_UNVERIFIED_GPU" in pair.report.reason, pair.report
    assert all(p.device.type == "cuda" for p in pair.fast.parameters())
    inputs = {"input_ids": torch.arange(8).view(1, 8).cuda()}
    assert_same_pair(pair, inputs, context=f"pre-quantised {name} on {device_map}")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)


# Architectures whose Linear layout differs from Llama's: multi-head latent attention with
# routed + shared experts, experts stored fused (3-D, not Linear: left unquantised), state-
# space layers, an image-text model with a vision tower, a seq2seq model with fp32-kept
# modules.
QUANTISED_ARCHS = ["deepseek_v3", "gpt_oss", "mamba", "gemma3", "t5"]


@pytest.fixture(scope="module")
def arch_bf16(tmp_path_factory):
    """name -> a bf16 checkpoint of that catalogue entry, built on first use."""
    build = checkpoint_builder(tmp_path_factory.mktemp("quant_archs"))

    def make(name):
        entry = get(name)
        if not entry.supported():
            pytest.skip(f"{name} is not buildable on transformers {transformers.__version__}")
        return str(build(entry, torch.bfloat16))

    return make


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.parametrize("name", ["int8", "nf4-double-bf16"])
@pytest.mark.parametrize("arch", QUANTISED_ARCHS)
def test_quantised_architectures_match_stock(arch_bf16, tmp_path, arch, name):
    """On the fly, then the pre-quantised checkpoint stock saves from that model (both fast
    on both lines): the same model as stock, quantised attributes included."""
    entry = get(arch)
    config = transformers.BitsAndBytesConfig(**CONFIGS[name])
    pair = load_pair(entry, arch_bf16(arch), quantization_config=config, device_map="cpu")
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, entry.make_inputs(pair.stock.config), context=f"{arch} {name} on the fly")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)
    assert _bnb_attributes(pair.fast), "nothing was quantised"

    saved = str(tmp_path / "prequantised")
    pair.stock.save_pretrained(saved)
    placed = load_both(entry.auto, saved, device_map="cpu")
    if placed.stock_raised:
        # 4.57 cannot load its own 4-bit save of some of these (a tensor is left on the meta
        # device, and dispatch_model's .to() raises): the patch must raise the same
        assert not IS_V5 and name.startswith("nf4"), placed.stock_error
        assert_matches_stock(placed, context=f"{arch} {name} pre-quantised")
        return
    assert placed.report.path == "fast", placed.report
    assert placed.report.tensors_mapped > 0
    assert_same_model(placed.stock, placed.fast, entry.make_inputs(placed.stock.config),
                      context=f"{arch} {name} pre-quantised")
    assert _bnb_attributes(placed.stock) == _bnb_attributes(placed.fast)


@needs_bnb_line
@needs_verified_bnb
def test_quantising_on_the_fly_through_a_model_class(llama_bf16):
    """Without an Auto class the config is read inside from_pretrained: the load stage
    learns the checkpoint is full precision, and quantises it on the fast path."""
    config = transformers.BitsAndBytesConfig(**CONFIGS["int8"])
    pair = load_pair(transformers.LlamaForCausalLM, llama_bf16, quantization_config=config, device_map="cpu")
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context="int8 on the fly, model class")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)


@pytest.mark.skipif(IS_V5, reason="5.x has no per-tensor is_serializable")
@needs_bnb_line
@needs_verified_bnb
def test_int8_serializable_is_asked_once_per_load(prequantised, monkeypatch):
    """4.57's 8-bit quantizer asks is_serializable (a package-metadata read) per tensor; the
    fast path asks once, and leaves nothing behind on the quantizer."""
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    asked, quantizers = [], []
    original = Bnb8BitHfQuantizer.is_serializable

    def counting(self, *args, **kwargs):
        asked.append(self)
        quantizers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Bnb8BitHfQuantizer, "is_serializable", counting)
    with fasthug_patch.enabled():
        model = transformers.AutoModelForCausalLM.from_pretrained(prequantised["int8"], device_map="cpu")
    assert fasthug_patch.last_report().path == "fast"
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    # once while loading, once more by stock's _process_model_after_weight_loading
    assert quantised and len(asked) <= 2, len(asked)
    assert all("is_serializable" not in vars(q) for q in quantizers)


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.parametrize("name", ["int8", "nf4"])
def test_quantising_in_inference_mode_matches_stock(llama_bf16, small_pieces, joined, name):
    """Inside torch.inference_mode() stock quantises on the loading thread, so its weights
    are inference tensors (tests/test_thread_modes.py); the pieces, run by threads outside
    the mode, still give the whole op's result, as the whole op gives it there."""
    config = transformers.BitsAndBytesConfig(**CONFIGS[name])
    with torch.inference_mode():
        pair = load_pair(transformers.AutoModelForCausalLM, llama_bf16, quantization_config=config, device_map="cpu")
    assert pair.report.path == "fast", pair.report
    assert joined and all(joined), "a piece failed, so the whole op ran"
    assert all(p.is_inference() for p in pair.stock.parameters())
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context=f"{name} in inference mode")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)


@needs_bnb_line
@needs_verified_bnb
@pytest.mark.parametrize("name", ["int8", "nf4-double-bf16"])
def test_quantised_checkpoint_in_inference_mode_loads_as_stock(prequantised, name):
    with torch.inference_mode():
        pair = load_pair(transformers.AutoModelForCausalLM, prequantised[name], device_map="cpu")
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context=f"pre-quantised {name}, inference mode")
    assert _bnb_attributes(pair.stock) == _bnb_attributes(pair.fast)


# -- the capability table ----------------------------------------------------------------------

def _facts(**kw) -> Facts:
    return Facts(transformers_version=transformers.__version__, device_kinds=frozenset({"cpu"}), **kw)


@pytest.mark.parametrize("stage", ["call", "load"])
def test_other_quantizers_run_stock_with_the_reason(stage):
    decision = capabilities.decide(_facts(quantization="gptq"), stage)
    assert not decision.fast and decision.rule == "quant-method" and "gptq" in decision.reason


def test_unverified_bitsandbytes_runs_stock():
    # on the 5.x line, where bitsandbytes would otherwise be fast (4.x stops earlier, at bnb-line)
    def facts(library):
        return Facts(transformers_version="5.23.0", quantization="bitsandbytes", quant_library=library,
                     device_kinds=frozenset({"cpu"}))
    decision = capabilities.decide(facts("0.42.0"), "call")
    assert not decision.fast and decision.rule == "bnb-version" and "0.42.0" in decision.reason
    missing = capabilities.decide(facts(None), "load")
    assert not missing.fast and "not installed" in missing.reason


@pytest.mark.parametrize("version", ["5.23.0", "4.57.6"])
@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "FASTHUG_UNVERIFIED_GPU=1"])
@pytest.mark.parametrize("pre_quantized", [False, True], ids=["on-the-fly", "pre-quantised"])
def test_bitsandbytes_on_a_gpu(version, opted_in, pre_quantized, monkeypatch):
    """bitsandbytes to a GPU, pre-quantised or on the fly, on 4.57 and 5.x, takes the fast
    path only once the GPU paths not yet run on a GPU are opted in; a refusal says how."""
    monkeypatch.setenv("FASTHUG_UNVERIFIED_GPU", "1" if opted_in else "0")
    facts = Facts(transformers_version=version, quantization="bitsandbytes", quant_library="0.50.2",
                  device_kinds=frozenset({"cuda"}), pre_quantized=pre_quantized)
    decision = capabilities.decide(facts, "load")
    assert decision.fast == opted_in, decision.reason
    if not decision.fast:
        assert decision.rule == "load-bnb-device" and "FASTHUG_UNVERIFIED_GPU" in decision.reason, decision.reason


@pytest.mark.parametrize("version, pre_quantized, fast, stages", [
    ("4.57.6", False, True, ("call", "load")),  # on the fly: create_quantized_param, kernels in pieces
    ("4.57.6", None, True, ("call",)),
    ("4.57.6", True, True, ("call", "load")),  # pre-quantised: placed by the fast path
    ("4.56.2", True, False, ("call", "load")),  # older lines ask check_quantized_param: stock
    ("4.56.2", False, False, ("call", "load")),
    ("4.43.4", None, False, ("call",)),
    ("5.23.0", False, True, ("call", "load")),
])
def test_bitsandbytes_lines(version, pre_quantized, fast, stages):
    facts = Facts(transformers_version=version, quantization="bitsandbytes", quant_library="0.50.2",
                  device_kinds=frozenset({"cpu"}), pre_quantized=pre_quantized)
    for stage in stages:
        decision = capabilities.decide(facts, stage)
        assert decision.fast == fast and (fast or decision.rule == "bnb-line"), (stage, decision)


def test_verified_bitsandbytes_on_cpu_is_fast():
    facts = Facts(transformers_version="5.23.0", quantization="bitsandbytes", quant_library="0.50.2",
                  device_kinds=frozenset({"cpu"}))
    assert capabilities.decide(facts, "call").fast and capabilities.decide(facts, "load").fast


def test_quantised_tensor_device_is_stocks_choice():
    """The device handed to create_quantized_param: the device map's entry found by stock's
    regex (longer keys first, so layers.10 is not taken for layers.1)."""
    from fasthug_patch.adapters.v4 import _param_device

    device_map = {"model.layers.1": "cpu", "model.layers.10": "disk", "": 0}
    assert _param_device(device_map, "model.layers.10.mlp.down_proj.weight") == "disk"
    assert _param_device(device_map, "model.layers.1.mlp.down_proj.weight") == "cpu"
    assert _param_device(device_map, "lm_head.weight") == 0
    assert _param_device(None, "lm_head.weight") == "cpu"
    with pytest.raises(Exception, match="has no device"):
        _param_device({"model.layers.1": "cpu"}, "lm_head.weight")


def test_submodule_lookups_are_memoised_for_one_shard_and_undone():
    from fasthug_patch.adapters.v4 import _submodules_memoised

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    walks = []
    real = model.get_submodule

    def counting(target):
        walks.append(target)
        return real(target)

    with _submodules_memoised(model):
        assert "get_submodule" in vars(model)  # on this instance alone
        assert model.get_submodule("1.0") is model[1][0]
        assert model.get_parameter("1.0.weight") is model[1][0].weight  # torch's helpers use it too
        with pytest.raises(AttributeError):
            model.get_submodule("2")  # a failed lookup fails as before...
        with pytest.raises(AttributeError):
            model.get_submodule("2")  # ...every time: not remembered
    assert "get_submodule" not in vars(model)
    assert model.get_submodule("1.0") is model[1][0]

    # One walk per path while memoised: wrap the class's walk and count.
    type(model).get_submodule, original = (lambda self, target: counting(target)), type(model).get_submodule
    try:
        with _submodules_memoised(model):
            for _ in range(3):
                model.get_submodule("1.0")
                model.get_parameter("0.weight")
        assert walks == ["1.0", "0"]
    finally:
        type(model).get_submodule = original


def test_submodule_memo_leaves_an_instance_override_alone():
    from fasthug_patch.adapters.v4 import _submodules_memoised

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    own = lambda target: "own"  # noqa: E731
    object.__setattr__(model, "get_submodule", own)
    with _submodules_memoised(model):
        assert model.get_submodule("0") == "own"
    assert vars(model)["get_submodule"] is own


def test_tensors_still_being_cast_are_assigned_after_the_quantised_ones():
    """4.57's order puts lm_head and the embeddings (the largest casts of a pre-quantised
    load) first: the placement goes on with the quantised tensors while they are cast, and
    assigns them after, in their own order; tensors already read go in stock's order."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from fasthug_patch.adapters.v4 import V4Adapter

    events = []

    def done(value):
        future = Future()
        future.set_result(value)
        return future

    class CastUnderWay(Future):
        def result(self, timeout=None):  # finishes when the placement waits for it
            if not self.done():
                self.set_result(torch.zeros(1))
            return super().result(timeout)

    class Engine:
        def submit(self, source, dtype, device, stock_casts_on_device=False):
            return CastUnderWay() if source.startswith("cast") else done(torch.zeros(1))

    class Quantizer:
        pre_quantized = True

        def param_needs_quantization(self, model, name):
            return name.startswith("q")

        def create_quantized_param(self, model, value, name, device):
            events.append(("quantised", name))

    def assign(model, name, tensor):
        events.append(("assigned", name))

    def infer(model, name, empty, keep_fp32, quantizer):
        return None, None

    utils = SimpleNamespace(_infer_parameter_dtype=infer, _load_parameter_into_model=assign)
    adapter = V4Adapter(SimpleNamespace(__version__="4.57.6"), utils)
    names = ["cast.lm_head", "cast.embed", "norm", "q.0", "q.1"]
    call = SimpleNamespace(materializer=Engine(), index=SimpleNamespace(check_unchanged=lambda files: None))
    shard = {"model": torch.nn.Module(), "state_dict": dict.fromkeys(names), "hf_quantizer": Quantizer(),
             "device_map": None, "shard_file": "s.safetensors"}
    adapter._load_shard(call, shard, [(name, name) for name in names])
    assert events == [("assigned", "norm"), ("quantised", "q.0"), ("quantised", "q.1"),
                      ("assigned", "cast.lm_head"), ("assigned", "cast.embed")]
