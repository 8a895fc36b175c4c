"""Work started while stock builds the model (cast_ahead.py): casts (Materializer.cast_ahead)
and the mapping of zero-copy views (Materializer.map_ahead). Which tensors are guessed, a
guess handed over only to the request it guessed, wrong guesses dropped, pages mapped only
for cached files, and whole loads the same as stock with guesses right and wrong."""

from __future__ import annotations

import os
import struct

import pytest
import torch
import transformers
from safetensors.torch import save_file

import fasthug_patch
from fasthug_patch import cast_ahead, loadcall
from fasthug_patch.engine import Materializer, materialize
from fasthug_patch.plan import CheckpointIndex, TensorRef
from tests.parity import assert_same_pair, dtype_kwargs, load_pair
from tests.tiny import save_tiny_llama

MiB = 1 << 20
needs_dtype_hook = pytest.mark.skipif(not hasattr(transformers.modeling_utils, "_get_dtype"),
                                      reason="casts start ahead where stock settles the dtype in _get_dtype (4.57, 5.x)")


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture()
def cached(tmp_path):
    """A page-cached file (just written) with two fp32 tensors."""
    torch.manual_seed(0)
    tensors = {"a": torch.randn(300, 1000), "b": torch.randn(70_001)}
    path = str(tmp_path / "c.safetensors")
    save_file(tensors, path)
    return tensors, CheckpointIndex().tensors([path])


def _engine() -> Materializer:
    return Materializer(threads=2, chunk_bytes=64 << 10, populate=None)


# -- the engine --------------------------------------------------------------------------------

def test_a_guess_is_handed_to_the_request_it_guessed(cached):
    tensors, refs = cached
    engine = _engine()
    try:
        assert engine.cast_ahead(list(refs.values()), torch.bfloat16) == 2
        ahead = engine._ahead[(refs["a"].file, refs["a"].name)][1]
        got = engine.submit(refs["a"], torch.bfloat16)
        assert got is ahead  # the cast already under way, not a second one
        assert _bits(got.result()) == _bits(tensors["a"].to(torch.bfloat16))
        assert engine.tensors_cast == 2  # b is still ahead, unasked
    finally:
        engine.close()
    assert engine.ahead_claimed == 1 and engine.tensors_cast == 1  # b was never asked for: not counted
    assert any("2 tensors, 1 of them" in note for note in engine.notes), engine.notes


@pytest.mark.parametrize("asked", [torch.float16, torch.float32, None], ids=["other-dtype", "view", "as-stored"])
def test_a_wrong_guess_is_waited_for_and_dropped(cached, asked):
    tensors, refs = cached
    engine = _engine()
    try:
        engine.cast_ahead([refs["a"]], torch.bfloat16)
        guess = engine._ahead[(refs["a"].file, refs["a"].name)][1]
        got = engine.submit(refs["a"], asked)
        assert guess.done(), "a request served before the guess on its bytes ended"
        assert got is not guess
        want = tensors["a"] if asked in (None, torch.float32) else tensors["a"].to(asked)
        assert _bits(got.result()) == _bits(want)
    finally:
        engine.close()
    assert engine.ahead_claimed == 0
    assert engine.tensors_cast == (1 if asked == torch.float16 else 0)


def test_nothing_is_guessed_for_cold_files_or_tensors_already_in_the_dtype(cached, monkeypatch):
    from fasthug_patch.engine import residency

    tensors, refs = cached
    engine = _engine()
    try:
        assert engine.cast_ahead(list(refs.values()), torch.float32) == 0  # already fp32
    finally:
        engine.close()
    monkeypatch.setattr(residency, "resident_fraction", lambda path: 0.0)
    engine = _engine()
    try:
        assert engine.cast_ahead(list(refs.values()), torch.bfloat16) == 0  # its fill comes first
        assert _bits(engine.submit(refs["b"], torch.bfloat16).result()) == _bits(tensors["b"].to(torch.bfloat16))
    finally:
        engine.close()


def test_unasked_guesses_end_with_the_load(cached):
    _, refs = cached
    engine = _engine()
    engine.cast_ahead(list(refs.values()), torch.float16)
    futures = [entry[1] for entry in engine._ahead.values()]
    engine.close()
    assert all(future.done() for future in futures)
    assert engine.tensors_cast == 0 and engine.bytes_read == 0


# -- the guess -----------------------------------------------------------------------------------

def _ref(name, dtype_name="BF16", nbytes=4 * MiB, offset=0):
    itemsize = {"BF16": 2, "F32": 4, "I8": 1, "F8_E4M3": 1}[dtype_name]
    return TensorRef("f.safetensors", name, dtype_name, (nbytes // itemsize,), offset, nbytes)


CONFIG = transformers.LlamaConfig()


def test_the_guess_takes_large_floating_tensors_stored_in_another_dtype():
    refs = {
        "big": _ref("big", offset=100),
        "first": _ref("first", "F32", offset=0),
        "small": _ref("small", nbytes=MiB - 2),
        "int": _ref("int", "I8"),
        "fp8": _ref("fp8", "F8_E4M3"),
    }
    chosen = cast_ahead.guess(refs, torch.float32, None, CONFIG, None)
    assert [ref.name for ref in chosen] == ["big"]  # first is fp32 already
    assert [ref.name for ref in cast_ahead.guess(refs, torch.float16, "cpu", CONFIG, None)] == ["first", "big"]


@pytest.mark.parametrize("device_map", ["cuda", "auto", {"": 0}, {"model": "cpu", "lm_head": "disk"}])
def test_no_guess_for_weights_placed_off_the_cpu(device_map):
    assert cast_ahead.guess({"w": _ref("w")}, torch.float32, device_map, CONFIG, None) == []


@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential"])
def test_an_automatic_map_counts_as_the_cpu_where_it_surely_resolves_there(monkeypatch, device_map):
    """No accelerator, no max_memory, and the weights (at the load's dtype) within
    AUTO_CPU_SHARE of the available memory: accelerate puts them all on the CPU."""
    monkeypatch.setattr(cast_ahead, "_accelerator_present", lambda: False)
    refs = {"w": _ref("w", nbytes=64 * MiB), "ids": _ref("ids", "I8", nbytes=8 * MiB)}
    # bf16 -> fp32: 128 MiB + 8 MiB; 272 MiB available is twice that
    monkeypatch.setenv("FASTHUG_MEMORY_AVAILABLE_MB", "272")
    assert cast_ahead.resolve_device_map(device_map, None, refs, torch.float32) == "cpu"
    assert [r.name for r in cast_ahead.guess(refs, torch.float32, "cpu", CONFIG, None)] == ["w"]
    monkeypatch.setenv("FASTHUG_MEMORY_AVAILABLE_MB", "271")  # one MiB short: accelerate might offload
    assert cast_ahead.resolve_device_map(device_map, None, refs, torch.float32) == device_map
    monkeypatch.setenv("FASTHUG_MEMORY_AVAILABLE_MB", "100000")
    assert cast_ahead.resolve_device_map(device_map, {"cpu": "100MiB"}, refs, torch.float32) == device_map
    monkeypatch.setattr(cast_ahead, "_accelerator_present", lambda: True)
    assert cast_ahead.resolve_device_map(device_map, None, refs, torch.float32) == device_map


@pytest.mark.parametrize("device_map", [None, "cpu", "cuda", {"": "cpu"}, {"model": "auto"}])
def test_other_maps_are_left_as_given(monkeypatch, device_map):
    monkeypatch.setattr(cast_ahead, "_accelerator_present", lambda: False)
    assert cast_ahead.resolve_device_map(device_map, None, {"w": _ref("w")}, torch.float32) is device_map


def test_no_guess_for_a_dtype_that_is_not_one_floating_dtype():
    refs = {"w": _ref("w")}
    assert cast_ahead.guess(refs, torch.int8, None, CONFIG, None) == []
    assert cast_ahead.guess(refs, None, None, CONFIG, None) == []


def test_quantised_loads_are_guessed_only_for_checkpoints_bitsandbytes_saved():
    config = transformers.LlamaConfig()
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    on_the_fly = {"w": _ref("w")}
    saved = {"w": _ref("w"), "layers.0.q.SCB": _ref("layers.0.q.SCB", "F32", nbytes=64)}
    assert cast_ahead.guess(on_the_fly, torch.float16, "cpu", config, None) == []
    assert [ref.name for ref in cast_ahead.guess(saved, torch.float16, "cpu", config, None)] == ["w"]


@pytest.mark.parametrize("present", [True, False], ids=["accelerator", "cpu-only"])
def test_without_a_device_map_a_quantised_load_is_guessed_only_where_there_is_no_accelerator(monkeypatch, present):
    """bitsandbytes' update_device_map puts the weights on the accelerator when there is one."""
    monkeypatch.setattr(cast_ahead, "_accelerator_present", lambda: present)
    config = transformers.LlamaConfig()
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    saved = {"w": _ref("w"), "layers.0.q.weight": _ref("layers.0.q.weight", "I8", offset=8 * MiB),
             "layers.0.q.SCB": _ref("layers.0.q.SCB", "F32", nbytes=64)}
    assert [ref.name for ref in cast_ahead.guess(saved, torch.float16, None, config, None)] == ([] if present else ["w"])
    views = cast_ahead.views(saved, torch.float16, None, config, None)
    assert [ref.name for ref in views] == ([] if present else ["layers.0.q.weight"])


def test_accelerator_presence_is_what_torch_says():
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not hasattr(accelerator, "is_available"):
        assert cast_ahead._accelerator_present()  # cannot tell: assume one
    else:
        assert cast_ahead._accelerator_present() == accelerator.is_available()


@pytest.mark.skipif(not hasattr(getattr(torch, "accelerator", None), "is_available"), reason="torch before 2.6")
def test_a_cuda_build_on_a_machine_without_a_gpu_has_no_accelerator(monkeypatch):
    """PyPI's default torch is a CUDA build: without a GPU its current_accelerator() still
    names CUDA, but stock's automatic map puts the weights on the CPU, so the casts can be
    guessed ahead there too."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert not cast_ahead._accelerator_present()
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    assert cast_ahead._accelerator_present()


def test_modules_the_class_keeps_in_fp32_are_not_guessed():
    class Kept:
        _keep_in_fp32_modules = ["wo"]
        _keep_in_fp32_modules_strict = ["router"]

    refs = {name: _ref(name, offset=i) for i, name in enumerate(
        ["layers.0.wo.weight", "layers.0.wov.weight", "router.weight", "layers.0.wi.weight"])}
    chosen = cast_ahead.guess(refs, torch.float16, None, CONFIG, Kept)
    assert [ref.name for ref in chosen] == ["layers.0.wov.weight", "layers.0.wi.weight"]


def test_views_are_the_tensors_stored_as_they_end_up():
    class Kept:
        _keep_in_fp32_modules = ["wo"]

    refs = {name: _ref(name, kind, offset=i * 8 * MiB) for i, (name, kind) in enumerate([
        ("embed.weight", "BF16"), ("layers.0.wi.weight", "F32"), ("layers.0.wo.weight", "F32"),
        ("layers.1.wo.weight", "BF16"), ("layers.0.q.weight", "I8"), ("tiny", "BF16")])}
    refs["tiny"] = _ref("tiny", nbytes=2, offset=99 * MiB)
    views = cast_ahead.views(refs, torch.bfloat16, "cpu", CONFIG, Kept)
    # fp32 modules the class keeps stay fp32; another fp32 tensor is cast, as is a kept bf16 one
    assert [ref.name for ref in views] == ["embed.weight", "layers.0.wo.weight", "layers.0.q.weight", "tiny"]
    assert not {ref.name for ref in views} & {ref.name for ref in cast_ahead.guess(refs, torch.bfloat16, "cpu", CONFIG, Kept)}


@pytest.mark.parametrize("device_map", ["cuda", "auto", {"model": "cpu", "lm_head": 0}])
def test_no_views_guessed_for_weights_placed_off_the_cpu(device_map):
    assert cast_ahead.views({"w": _ref("w")}, torch.bfloat16, device_map, CONFIG, None) == []


def test_no_views_guessed_when_quantising_on_the_fly():
    config = transformers.LlamaConfig()
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    assert cast_ahead.views({"w": _ref("w")}, torch.bfloat16, "cpu", config, None) == []


def test_extents_merge_neighbouring_tensors_of_one_file():
    a = TensorRef("a", "x", "BF16", (4,), 0, 8)
    b = TensorRef("a", "y", "BF16", (4,), 8 + 1000, 8)  # a small gap: one range
    c = TensorRef("a", "z", "BF16", (4,), 10 * MiB, 8)  # far: a range of its own
    d = TensorRef("b", "w", "BF16", (4,), 16, 8)
    empty = TensorRef("b", "e", "BF16", (0,), 100, 0)
    assert materialize._extents([a, b, c, d, empty]) == [("a", 0, 1016), ("a", 10 * MiB, 10 * MiB + 8), ("b", 16, 24)]


def _pages_mapped(address: int, length: int) -> tuple[int, int]:
    """How many of the pages of [address, address+length) this process has mapped (the
    present bit of /proc/self/pagemap, which needs no privilege), and how many there are."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = address // page, (address + length - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", pagemap.read((last - first + 1) * 8))
    return sum(entry >> 63 for entry in entries), len(entries)


@pytest.fixture()
def cached_bf16(tmp_path):
    """A page-cached file of two 1 MiB bf16 tensors with a small one between them."""
    torch.manual_seed(0)
    tensors = {"a": torch.randn(512, 1024).bfloat16(), "s": torch.randn(10).bfloat16(),
               "b": torch.randn(1024, 512).bfloat16()}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    return tensors, CheckpointIndex().tensors([path])


def test_map_ahead_maps_the_views_pages_before_anyone_reads_them(cached_bf16):
    tensors, refs = cached_bf16
    engine = Materializer(threads=2, chunk_bytes=64 << 10, populate=None)
    views = [refs["a"], refs["b"]]
    try:
        assert engine.map_ahead(views) == refs["b"].offset + refs["b"].nbytes - refs["a"].offset  # one range
        mapped = engine.files.get(refs["a"].file)
    finally:
        engine.close()  # waits for the pieces; the mapping stays while it is referenced
    assert any("mapped ahead of the loader" in note for note in engine.notes), engine.notes
    for ref in views:
        present, pages = _pages_mapped(mapped.base + ref.offset, ref.nbytes)
        assert present == pages > 0, (ref.name, present, pages)
    assert _bits(mapped.tensor(refs["a"])) == _bits(tensors["a"])  # the same bytes, only mapped earlier


def test_map_ahead_leaves_cold_files_and_a_populate_off_setting_alone(cached_bf16, monkeypatch):
    from fasthug_patch.engine import residency

    _, refs = cached_bf16
    engine = Materializer(threads=2, chunk_bytes=64 << 10, populate=False)
    try:
        assert engine.map_ahead([refs["a"]]) == 0  # FASTHUG_POPULATE=0
    finally:
        engine.close()
    monkeypatch.setattr(residency, "resident_fraction", lambda path: 0.0)
    engine = Materializer(threads=2, chunk_bytes=64 << 10, populate=None)
    try:
        assert engine.map_ahead([refs["a"]]) == 0  # cold: mapped as it is read, not ahead
    finally:
        engine.close()
    assert not any("mapped ahead" in note for note in engine.notes)


def test_map_ahead_over_a_file_truncated_under_it_is_quiet(cached_bf16, monkeypatch):
    """A piece that cannot be mapped (the file shrank) is not this work's error to raise: the
    load's own checks report the changed file. No SIGBUS, no exception from close()."""
    from fasthug_patch.engine.mapped import MappedFile

    _, refs = cached_bf16
    raised = []
    populate_bytes = MappedFile.populate_bytes

    def recording(self, *args, **kwargs):
        try:
            return populate_bytes(self, *args, **kwargs)
        except Exception as exc:
            raised.append(exc)
            raise

    monkeypatch.setattr(MappedFile, "populate_bytes", recording)
    engine = Materializer(threads=2, chunk_bytes=64 << 10, populate=None)
    try:
        engine.files.get(refs["a"].file)  # mapped at its full size
        os.truncate(refs["a"].file, 4096)
        assert engine.map_ahead([refs["a"], refs["b"]]) > 0
    finally:
        engine.close()
    assert engine._failed is None
    assert raised and refs["a"].file in str(raised[0]), raised  # the truncation was met, and named the file


# -- whole loads ---------------------------------------------------------------------------------

@pytest.fixture()
def every_tensor_guessed(monkeypatch):
    """Guess every tensor of the tiny checkpoints (they are far below MIN_BYTES), and record
    what the engine did with the guesses."""
    monkeypatch.setattr(cast_ahead, "MIN_BYTES", 0)
    seen = []
    close = Materializer.close

    def recording(self, cancel=False):
        if self.ahead_started:
            seen.append((self.ahead_started, self.ahead_claimed))
        return close(self, cancel)

    monkeypatch.setattr(Materializer, "close", recording)
    return seen


@needs_dtype_hook
@pytest.mark.parametrize("stored, asked", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                           (torch.bfloat16, None)], ids=["fp32-bf16", "bf16-fp16", "no-dtype"])
def test_loads_with_guesses_are_stock_loads(tmp_path, every_tensor_guessed, stored, asked):
    path = save_tiny_llama(str(tmp_path / "tiny"), dtype=stored)
    pair = load_pair(transformers.AutoModelForCausalLM, path, **dtype_kwargs(asked))
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context=f"{stored} as {asked}")
    expected = asked if asked is not None else torch.get_default_dtype()  # 4.x builds in the default
    if transformers.__version__.startswith("4.") or asked is not None:
        assert every_tensor_guessed, "nothing was cast ahead"
        started, claimed = every_tensor_guessed[-1]
        assert started == claimed == pair.report.tensors_cast, (every_tensor_guessed, pair.report)
        assert all(p.dtype == expected for p in pair.fast.parameters())


@needs_dtype_hook
def test_an_automatic_map_on_a_machine_without_accelerator_is_guessed(tmp_path, every_tensor_guessed, monkeypatch):
    """device_map="auto" where torch sees no accelerator: stock places every weight on the
    CPU, and the casts started ahead are the ones it asks for."""
    if cast_ahead._accelerator_present():
        pytest.skip("here stock's automatic map puts the weights on the accelerator")
    path = save_tiny_llama(str(tmp_path / "tiny"), dtype=torch.float32)
    pair = load_pair(transformers.AutoModelForCausalLM, path, device_map="auto", **dtype_kwargs(torch.bfloat16))
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context="device_map=auto on the CPU")
    assert every_tensor_guessed, "nothing was cast ahead"
    started, claimed = every_tensor_guessed[-1]
    assert started == claimed == pair.report.tensors_cast, (every_tensor_guessed, pair.report)
    assert {p.device.type for p in pair.fast.parameters()} == {"cpu"}


@needs_dtype_hook
def test_wrong_guesses_leave_the_model_as_stock(tmp_path, every_tensor_guessed, monkeypatch):
    """Every tensor guessed as float16 while the loader asks for bfloat16: each request waits
    for its guess, drops it, and casts as usual."""
    path = save_tiny_llama(str(tmp_path / "tiny"), dtype=torch.float32)
    real = loadcall.LoadCall.cast_ahead
    monkeypatch.setattr(loadcall.LoadCall, "cast_ahead",
                        lambda self, dtype, config: real(self, torch.float16, config))
    pair = load_pair(transformers.AutoModelForCausalLM, path, **dtype_kwargs(torch.bfloat16))
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context="wrong guesses")
    started, claimed = every_tensor_guessed[-1]
    assert started > 0 and claimed == 0
    assert pair.report.tensors_cast == started  # each cast once, as asked; the guesses are not counted


def test_cast_ahead_can_be_turned_off(tmp_path, every_tensor_guessed, monkeypatch):
    monkeypatch.setenv("FASTHUG_CAST_AHEAD", "0")
    path = save_tiny_llama(str(tmp_path / "tiny"), dtype=torch.float32)
    with fasthug_patch.enabled():
        transformers.AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(torch.bfloat16))
    assert fasthug_patch.last_report().path == "fast"
    assert every_tensor_guessed == []


@needs_dtype_hook
def test_guesses_are_dropped_when_the_loader_goes_stock(tmp_path, every_tensor_guessed, monkeypatch):
    """A load-stage decline hands the weights to stock's internals: the casts started ahead
    are cancelled then, not held until the call ends beside stock's own copies."""
    from fasthug_patch import capabilities

    path = save_tiny_llama(str(tmp_path / "tiny"), dtype=torch.float32)
    decide = capabilities.decide
    monkeypatch.setattr(capabilities, "decide", lambda facts, stage: capabilities.Decision(False, "declined here", "t")
                        if stage == "load" else decide(facts, stage))
    drops = []
    drop = Materializer.drop_ahead

    def recording(self):
        call = loadcall.current()
        drops.append((len(self._ahead), call is not None and not call.stock_loads))
        return drop(self)

    monkeypatch.setattr(Materializer, "drop_ahead", recording)
    pair = load_pair(transformers.AutoModelForCausalLM, path, **dtype_kwargs(torch.bfloat16))
    assert pair.report.path == "fallback" and "declined here" in pair.report.reason
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context="declined at the load stage")
    assert drops and drops[0][0] > 0 and drops[0][1], drops  # dropped as the decline was recorded
    started, claimed = every_tensor_guessed[-1]
    assert started > 0 and claimed == 0


@needs_dtype_hook
@pytest.mark.parametrize("populate", [None, "0"], ids=["default", "populate-off"])
def test_loads_map_their_views_ahead_and_stay_stock_loads(tmp_path, monkeypatch, populate):
    if populate is not None:
        monkeypatch.setenv("FASTHUG_POPULATE", populate)
    path = save_tiny_llama(str(tmp_path / "tiny"), dtype=torch.bfloat16)
    pair = load_pair(transformers.AutoModelForCausalLM, path, **dtype_kwargs(torch.bfloat16))
    assert pair.report.path == "fast", pair.report
    assert_same_pair(pair, {"input_ids": torch.arange(8).view(1, 8)}, context="views mapped ahead")
    mapped_ahead = [note for note in pair.report.notes if "mapped ahead of the loader" in note]
    assert bool(mapped_ahead) == (populate is None), pair.report.notes
