"""FASTHUG_IO=direct: cold files read with O_DIRECT into fresh tensors (engine/direct.py)."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from fasthug_patch.bench.runner import evict as _evict
from fasthug_patch.engine import Materializer, direct, residency
from fasthug_patch.engine.materialize import needs_cast
from fasthug_patch.errors import CheckpointError
from fasthug_patch.plan import CheckpointIndex
from tests.test_engine import _bits, special_tensors


def _cold(path: str) -> str:
    refused = direct.supported(path)
    if refused is not None:
        pytest.skip(f"this filesystem refuses O_DIRECT: {refused}")
    _evict(path)
    if residency.resident_fraction(path) > 0.5:
        pytest.skip("this filesystem does not drop cached pages on request")
    return path


@pytest.fixture()
def cold_checkpoint(tmp_path):
    # odd sizes: tensors start and end inside 4 KiB blocks
    tensors = special_tensors(bf16=(30_001,), fp32=(12_289, 1), fp16=(5_003,), ints=1_001)
    path = str(tmp_path / "c.safetensors")
    save_file(tensors, path)
    return _cold(path), tensors, CheckpointIndex().tensors([path])


@pytest.mark.parametrize("chunk", [64, 4096, 1 << 20])
@pytest.mark.parametrize("target", [None, torch.float32, torch.bfloat16, torch.float16])
def test_direct_reads_equal_torch_casts_bitwise_and_skip_the_page_cache(cold_checkpoint, chunk, target):
    path, tensors, refs = cold_checkpoint
    engine = Materializer(threads=3, chunk_bytes=chunk, populate=None, io_mode="direct")
    try:
        engine.prepare([path])
        got = {}
        for name, ref in refs.items():
            dtype = target if tensors[name].is_floating_point() else None
            got[name] = (dtype, engine.submit(ref, dtype).result(timeout=60))
    finally:
        engine.close()
    assert engine.io[path].startswith("direct: O_DIRECT"), engine.io
    mapped = engine.files.get(path)
    for name, (dtype, tensor) in got.items():
        want = tensors[name].to(dtype) if dtype is not None else tensors[name]
        assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
        assert _bits(tensor) == _bits(want), name
        assert tensor.is_contiguous()
        if tensor.numel():
            assert not mapped.base <= tensor.data_ptr() < mapped.base + mapped.size, f"{name} is a view of the mapping"
    copied = sum(1 for name, (dtype, _) in got.items() if dtype in (None, tensors[name].dtype))
    assert (engine.tensors_copied, engine.tensors_cast) == (copied, len(got) - copied)
    assert engine.tensors_mapped == 0
    assert residency.resident_fraction(path) < 0.5, "O_DIRECT reads went through the page cache"


def test_a_cached_file_is_still_mapped_zero_copy(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_file({"w": torch.randn(4096)}, path)
    open(path, "rb").read()
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=None, io_mode="direct")
    refs = CheckpointIndex().tensors([path])
    view = engine.submit(refs["w"]).result()
    engine.close()
    assert engine.io[path].startswith("mmap") and engine.tensors_mapped == 1
    mapped = engine.files.get(path)
    assert mapped.base <= view.data_ptr() < mapped.base + mapped.size


def test_a_file_truncated_before_its_read_is_an_error_naming_file_and_tensor(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"a": torch.randn(4096), "b": torch.randn(64 * 1024)}, path)
    refs = CheckpointIndex().tensors([path])
    _cold(path)
    engine = Materializer(threads=2, chunk_bytes=8192, populate=None, io_mode="direct")
    engine.prepare([path])
    os.truncate(path, refs["b"].offset + 10_000)  # "b" now ends inside the file's last block
    with pytest.raises(CheckpointError) as info:
        engine.submit(refs["b"], torch.bfloat16).result(timeout=30)
    engine.close(cancel=True)
    assert path in str(info.value) and "truncated" in str(info.value)
    assert info.value.tensor == "b"


def test_a_read_error_is_an_error_naming_the_file(cold_checkpoint, monkeypatch):
    path, _, refs = cold_checkpoint
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=None, io_mode="direct")
    engine.prepare([path])

    def failing(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(CheckpointError, match="Input/output error") as info:
        engine.submit(refs["fp32"], torch.bfloat16).result(timeout=30)
    monkeypatch.undo()
    engine.close(cancel=True)
    assert path in str(info.value)


def test_where_o_direct_is_refused_the_file_is_read_through_the_page_cache(cold_checkpoint, monkeypatch):
    path, tensors, refs = cold_checkpoint
    monkeypatch.setattr(direct, "supported", lambda name: "O_DIRECT refused (Invalid argument)")
    monkeypatch.setattr("fasthug_patch.engine.materialize.FILL_MIN_BYTES", 0)
    engine = Materializer(threads=2, chunk_bytes=4096, populate=None, io_mode="direct")
    engine.prepare([path])
    got = engine.submit(refs["fp32"], torch.bfloat16).result(timeout=30)
    engine.close()
    assert engine.io[path].startswith("read:"), engine.io
    assert any("O_DIRECT refused" in note for note in engine.notes), engine.notes
    assert _bits(got) == _bits(tensors["fp32"].to(torch.bfloat16))


def test_casts_started_ahead_are_read_directly_and_claimed(cold_checkpoint):
    path, tensors, refs = cold_checkpoint
    engine = Materializer(threads=2, chunk_bytes=4096, populate=None, io_mode="direct")
    try:
        engine.prepare([path])
        started = engine.cast_ahead(refs.values(), torch.bfloat16)
        casts = [name for name, ref in refs.items() if needs_cast(ref, torch.bfloat16) and ref.nbytes]
        assert started == len(casts) >= 3
        got = {name: engine.submit(refs[name], torch.bfloat16).result(timeout=30) for name in casts}
    finally:
        engine.close()
    assert engine.ahead_claimed == started
    for name in casts:
        assert _bits(got[name]) == _bits(tensors[name].to(torch.bfloat16)), name


def test_direct_reads_leave_no_descriptor_or_thread(cold_checkpoint):
    path, _, refs = cold_checkpoint
    fds_before = len(os.listdir("/proc/self/fd"))
    engine = Materializer(threads=4, chunk_bytes=4096, populate=None, io_mode="direct")
    engine.prepare([path])
    [engine.submit(ref, torch.float16 if ref.dtype_name.startswith(("F", "B")) else None).result() for ref in refs.values()]
    engine.close()
    assert engine.io[path].startswith("direct")
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert not [t for t in threading.enumerate() if t.name.startswith(("fasthug-reader", "fasthug-cast"))]


@pytest.mark.parametrize("begin, length", [(0, 1), (1, 4095), (4095, 2), (4096, 4096), (5000, 10_000)])
def test_a_read_returns_the_bytes_asked_for_wherever_they_lie(tmp_path, begin, length):
    path = str(tmp_path / "bytes.bin")
    data = os.urandom(20_000)  # ends inside a block
    with open(path, "wb") as f:
        f.write(data)
    _cold(path)
    reader = direct.DirectFile(path)
    buffers = direct.ThreadBuffers(direct.span(length))
    buffer = buffers.get()
    at = reader.read(memoryview(buffer), begin, length, "x")
    reader.close()
    assert buffer[at : at + length] == data[begin : begin + length]
    past_the_end = direct.DirectFile(path)
    with pytest.raises(CheckpointError, match="file ended") as info:
        past_the_end.read(memoryview(direct.ThreadBuffers(direct.span(2_000)).get()), 19_000, 2_000, "x")
    past_the_end.close()
    assert path in str(info.value)


@pytest.mark.parametrize("stored, asked", [(torch.float32, torch.bfloat16), (torch.bfloat16, None),
                                           (torch.bfloat16, torch.float32)], ids=["fp32-bf16", "bf16", "bf16-fp32"])
@pytest.mark.parametrize("shards", [None, "20KB"], ids=["single", "sharded"])
def test_a_cold_load_read_directly_is_the_stock_model(tmp_path, monkeypatch, stored, asked, shards):
    import transformers

    import fasthug_patch
    from tests.parity import LoadedPair, assert_same_pair, checkpoint_files, dtype_kwargs, load_model
    from tests.tiny import save_tiny_llama

    path = save_tiny_llama(str(tmp_path / "tiny"), dtype=stored, **({"max_shard_size": shards} if shards else {}))
    kwargs = dtype_kwargs(asked)
    # Stock reads a copy: its model maps its files, and mapped pages cannot be evicted.
    stock_path = shutil.copytree(path, str(tmp_path / "stock-copy"))
    with fasthug_patch.disabled():
        stock, stock_info = load_model(transformers.AutoModelForCausalLM, stock_path, **kwargs)
    stock.config._name_or_path = path  # the only thing the copy's path changes
    files = [str(f) for f in checkpoint_files(path)]
    for name in files:
        _cold(name)
    monkeypatch.setenv("FASTHUG_IO", "direct")
    with fasthug_patch.enabled():
        fast, fast_info = load_model(transformers.AutoModelForCausalLM, path, **kwargs)
        report = fasthug_patch.last_report()
    assert report.path == "fast", report
    assert all(report.io[name].startswith("direct") for name in files), report.io
    assert report.tensors_mapped == 0 and report.tensors_cast + report.tensors_copied > 0, report
    assert_same_pair(LoadedPair(stock, stock_info, fast, fast_info, report), {"input_ids": torch.arange(8).view(1, 8)},
                     context=f"{stored} as {asked}, read with O_DIRECT")
