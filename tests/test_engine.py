"""The materializer: zero-copy views, chunked casts equal to torch's own, errors, cleanup."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from fasthug_patch.bench.runner import evict as _evict
from fasthug_patch.engine import Materializer, residency
from fasthug_patch.engine.mapped import MappedFile
from fasthug_patch.errors import CheckpointError
from fasthug_patch.plan import CheckpointIndex


def _special_values(n: int, dtype) -> torch.Tensor:
    torch.manual_seed(0)
    values = torch.randn(n, dtype=torch.float32) * 1e3
    values[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 65504.0, 1e38])
    return values.to(dtype)


def special_tensors(bf16=(73, 137), fp32=(4_099,), fp16=(3_001,), ints=77) -> dict:
    """One tensor of each kind the engine treats apart, floats holding special values."""
    def floats(shape, dtype):
        return _special_values(torch.Size(shape).numel(), dtype).view(shape)

    return {
        "bf16": floats(bf16, torch.bfloat16),
        "fp32": floats(fp32, torch.float32),
        "fp16": floats(fp16, torch.float16),
        "int": torch.arange(ints, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.25),
    }


@pytest.fixture()
def checkpoint(tmp_path):
    tensors = special_tensors()
    path = str(tmp_path / "c.safetensors")
    save_file(tensors, path)
    return path, tensors, CheckpointIndex().tensors([path])


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("io_mode", ["mmap", "read"])
@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("target", [None, torch.float32, torch.bfloat16, torch.float16])
def test_results_equal_torch_casts_bitwise(checkpoint, chunk, target, io_mode):
    _, tensors, refs = checkpoint
    engine = Materializer(threads=3, chunk_bytes=chunk, populate=True, io_mode=io_mode)
    try:
        for name, ref in refs.items():
            expected = tensors[name]
            dtype = target if expected.is_floating_point() else None
            got = engine.submit(ref, dtype).result()
            want = expected.to(dtype) if dtype is not None else expected
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert _bits(got) == _bits(want), name
            assert got.is_contiguous()
    finally:
        engine.close()


def test_same_dtype_is_zero_copy_and_private(checkpoint):
    path, tensors, refs = checkpoint
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=True)
    view = engine.submit(refs["fp32"], torch.float32).result()
    engine.close()
    mapped = engine.files.get(path)
    assert mapped.base <= view.data_ptr() < mapped.base + mapped.size, "not a view of the mapping"
    assert view.untyped_storage().nbytes() == refs["fp32"].nbytes, "each tensor has its own storage"
    before = open(path, "rb").read()
    view[0] = 42.0  # copy-on-write: the file must not change
    assert open(path, "rb").read() == before


def test_tensor_source_same_dtype_shares_storage():
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=False)
    source = torch.arange(10, dtype=torch.float32)
    same = engine.submit(source, torch.float32).result()
    cast = engine.submit(source, torch.float16).result()
    engine.close()
    assert same.data_ptr() == source.data_ptr()
    assert cast.dtype == torch.float16 and torch.equal(cast, source.half())


def test_unaligned_tensor_is_copied_correctly(tmp_path):
    # A 3-byte tensor before an fp32 one puts the fp32 bytes at an odd offset.
    path = str(tmp_path / "u.safetensors")
    header = json.dumps({
        "a_bytes": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b_f32": {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]},
    }).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes([1, 2, 3]) + torch.arange(5.0).numpy().tobytes())
    refs = CheckpointIndex().tensors([path])
    assert refs["b_f32"].offset % 4 != 0
    engine = Materializer(threads=2, chunk_bytes=8, populate=True)
    got = engine.submit(refs["b_f32"], torch.float32).result()
    engine.close()
    assert torch.equal(got, torch.arange(5.0))


def test_truncated_file_is_an_error_naming_file_and_tensor(tmp_path):
    path = str(tmp_path / "t.safetensors")
    save_file({"w": torch.randn(64 * 1024)}, path)
    refs = CheckpointIndex().tensors([path])
    mapped = MappedFile(path)
    os.truncate(path, 4096)  # shrinks under the mapping
    with pytest.raises(CheckpointError) as info:
        mapped.check_size(refs["w"])  # what every reader of the bytes asks first
    assert path in str(info.value) and "'w'" in str(info.value)
    with pytest.raises(CheckpointError, match="could not be read"):
        mapped.populate(refs["w"], 0, refs["w"].nbytes)  # EFAULT, not SIGBUS


def test_view_past_the_mapping_is_an_error_naming_file_and_tensor(tmp_path):
    # A view reads nothing, so it is checked against the mapping alone (no stat per tensor);
    # bytes past what was mapped are refused all the same.
    path = str(tmp_path / "t.safetensors")
    save_file({"w": torch.randn(64 * 1024)}, path)
    refs = CheckpointIndex().tensors([path])
    os.truncate(path, 4096)
    mapped = MappedFile(path)  # mapped after the shrink: 4096 bytes
    with pytest.raises(CheckpointError) as info:
        mapped.tensor(refs["w"])
    assert path in str(info.value) and "'w'" in str(info.value)


def test_views_are_checked_against_their_file_before_others_read_them(tmp_path):
    # What a weight conversion or a quantizer is handed is checked just before it reads:
    # a view whose bytes a shrink cut off is an error naming the file and the tensor; a
    # view still inside the file, and tensors that are not views of it, pass.
    path = str(tmp_path / "t.safetensors")
    save_file({"a": torch.randn(16), "w": torch.randn(64 * 1024)}, path)
    refs = CheckpointIndex().tensors([path])
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=False)
    try:
        early, late = (engine.submit(refs[name], torch.float32).result() for name in ("a", "w"))
        engine.check_views([early, late, torch.ones(3)], "experts")  # the file is whole
        os.truncate(path, refs["w"].offset + 4096)  # cuts off most of "w", none of "a"
        engine.check_views([early, torch.ones(3)], "experts")
        with pytest.raises(CheckpointError) as info:
            engine.check_views([early, late], "experts")
        assert path in str(info.value) and "'w'" in str(info.value)
    finally:
        engine.close()


def test_error_in_a_chunk_fails_the_future_and_close_returns(checkpoint, monkeypatch):
    _, _, refs = checkpoint
    engine = Materializer(threads=2, chunk_bytes=64, populate=True)
    import fasthug_patch.engine.materialize as materialize

    calls = {"n": 0}
    real = materialize._cast_mapped_span

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        return real(*args)

    monkeypatch.setattr(materialize, "_cast_mapped_span", flaky)
    future = engine.submit(refs["bf16"], torch.float32)
    with pytest.raises(OSError, match="disk went away"):
        future.result(timeout=30)
    later = engine.submit(refs["fp32"], torch.float16)  # queued after the failure: cancelled
    with pytest.raises(Exception):
        later.result(timeout=30)
    engine.close(cancel=True)
    assert not [t for t in threading.enumerate() if t.name.startswith(("fasthug-reader", "fasthug-cast"))]


def test_no_leaked_threads_or_descriptors(checkpoint):
    _, _, refs = checkpoint
    fds_before = len(os.listdir("/proc/self/fd"))
    engine = Materializer(threads=4, chunk_bytes=128, populate=True)
    results = [engine.submit(ref, torch.float16 if ref.dtype_name.startswith(("F", "B")) else None) for ref in refs.values()]
    [f.result() for f in results]
    engine.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the map keeps no descriptor open
    assert not [t for t in threading.enumerate() if t.name.startswith(("fasthug-reader", "fasthug-cast"))]


def test_reading_is_chosen_per_file_from_its_residency(tmp_path, monkeypatch):
    monkeypatch.setattr("fasthug_patch.engine.materialize.FILL_MIN_BYTES", 0)
    warm, cold = str(tmp_path / "warm.safetensors"), str(tmp_path / "cold.safetensors")
    save_file({"w": torch.randn(256, 1024)}, warm)
    save_file({"c": torch.randn(256, 1024)}, cold)
    open(warm, "rb").read()
    _evict(cold)
    if residency.resident_fraction(cold) > 0.5:
        pytest.skip("this filesystem does not drop cached pages on request")
    engine = Materializer(threads=4, chunk_bytes=1 << 16, populate=True)
    refs = CheckpointIndex().tensors([warm, cold])
    engine.prepare([warm, cold])
    got = {name: engine.submit(ref).result() for name, ref in refs.items()}
    engine.close()
    assert engine.io[warm].startswith("mmap") and "cached" in engine.io[warm]
    assert engine.io[cold].startswith("read") and "preadv" in engine.io[cold]
    assert residency.resident_fraction(cold) == 1.0  # filled, then mapped zero-copy
    mapped = engine.files.get(cold)
    assert mapped.base <= got["c"].data_ptr() < mapped.base + mapped.size
    assert torch.equal(got["c"], load_file(cold)["c"])


def test_a_file_shrinking_during_the_fill_is_an_error_naming_it(tmp_path):
    path = str(tmp_path / "s.safetensors")
    save_file({"w": torch.randn(64 * 1024)}, path)
    refs = CheckpointIndex().tensors([path])
    engine = Materializer(threads=2, chunk_bytes=4096, populate=True, io_mode="read")
    os.truncate(path, 8192)  # after the header was read, before the fill
    with pytest.raises(CheckpointError) as info:
        engine.submit(refs["w"], torch.float16).result(timeout=30)
    engine.close(cancel=True)
    assert path in str(info.value)


def test_fill_keeps_no_descriptor_or_thread(checkpoint):
    _, _, refs = checkpoint
    fds_before = len(os.listdir("/proc/self/fd"))
    engine = Materializer(threads=4, chunk_bytes=256, populate=True, io_mode="read")
    [engine.submit(ref).result() for ref in refs.values()]
    engine.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert not [t for t in threading.enumerate() if t.name.startswith(("fasthug-reader", "fasthug-cast"))]


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_cast_source_pages_are_unmapped_after_their_cast(tmp_path):
    path = str(tmp_path / "big.safetensors")
    tensor = torch.randn(16 << 20)  # 64 MiB of fp32
    save_file({"w": tensor}, path)
    refs = CheckpointIndex().tensors([path])
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=True, io_mode="mmap")
    before = _rss_file_bytes()
    got = engine.submit(refs["w"], torch.bfloat16).result()
    grown = _rss_file_bytes() - before
    engine.close()
    assert torch.equal(got, tensor.to(torch.bfloat16))
    assert grown < 8 << 20, f"the process still maps {grown >> 20} MiB of the 64 MiB source"


def test_a_released_view_leaves_the_process_and_still_reads_the_same(tmp_path):
    """MappedFiles.release_view (a quantised source): its pages leave the process, a read
    faults the same bytes back, and tensors that are not views of a mapping are left."""
    path = str(tmp_path / "big.safetensors")
    tensor = torch.randn(16 << 20)  # 64 MiB of fp32
    save_file({"w": tensor, "b": torch.ones(3)}, path)
    refs = CheckpointIndex().tensors([path])
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=True, io_mode="mmap")
    before = _rss_file_bytes()
    view = engine.submit(refs["w"]).result()
    assert view.sum().item() == tensor.sum().item()  # every page mapped
    touched = _rss_file_bytes() - before
    assert engine.files.release_view(view)
    released = _rss_file_bytes() - before
    assert not engine.files.release_view(tensor)  # anonymous memory: not ours to drop
    assert not engine.files.release_view(torch.ones(3))
    assert torch.equal(view, tensor)
    engine.close()
    assert touched > 48 << 20 and released < 8 << 20, (touched >> 20, released >> 20)


def test_files_larger_than_free_memory_are_read_lazily(checkpoint, monkeypatch):
    path, tensors, refs = checkpoint
    monkeypatch.setenv("FASTHUG_MEMORY_AVAILABLE_MB", "0")
    engine = Materializer(threads=2, chunk_bytes=64, populate=True, io_mode="read")
    with pytest.warns(UserWarning, match="exceed the memory available"):
        engine.prepare([path])
    got = {name: engine.submit(ref).result() for name, ref in refs.items()}
    engine.close()
    assert "first use" in engine.io[path] and engine.notes
    for name, tensor in tensors.items():
        assert _bits(got[name]) == _bits(tensor), name


def test_a_cast_stops_the_fill_and_the_rest_is_read_through_the_mapping(tmp_path):
    path = str(tmp_path / "f.safetensors")
    tensors = {f"w{i}": torch.randn(4096) for i in range(8)}
    save_file(tensors, path)
    refs = CheckpointIndex().tensors([path])
    engine = Materializer(threads=2, chunk_bytes=4096, populate=None, io_mode="read")
    engine.prepare([path])
    fill = engine._fills[path]
    first = engine.submit(refs["w0"], torch.bfloat16)
    assert fill.stopped  # casts read through the mapping: no second copy of every byte
    got = {name: engine.submit(ref).result() for name, ref in refs.items() if name != "w0"}
    got["w0"] = first.result()
    engine.close()
    assert torch.equal(got["w0"], tensors["w0"].to(torch.bfloat16))
    for name in tensors:
        if name != "w0":
            assert torch.equal(got[name], tensors[name]), name


def test_sampled_residency_agrees_with_the_full_count(tmp_path):
    path = str(tmp_path / "r.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(32 << 20))
    _evict(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
    os.pread(fd, 16 << 20, 0)  # the first half cached
    os.close(fd)
    full = residency.resident_fraction(path, windows=None)
    if not 0.3 < full < 0.8:
        pytest.skip(f"this filesystem caches differently ({full:.0%} after reading half)")
    assert residency.resident_fraction(path, windows=64) == pytest.approx(full, abs=0.1)



def test_a_small_cold_file_is_left_to_the_kernels_readahead(tmp_path):
    path = str(tmp_path / "small.safetensors")
    save_file({"w": torch.randn(256, 1024)}, path)
    _evict(path)
    if residency.resident_fraction(path) > 0.5:
        pytest.skip("this filesystem does not drop cached pages on request")
    engine = Materializer(threads=4, chunk_bytes=1 << 16, populate=None)
    refs = CheckpointIndex().tensors([path])
    got = engine.submit(refs["w"]).result()
    engine.close()
    assert "small: read on first use" in engine.io[path] and path not in engine._fills
    assert torch.equal(got, load_file(path)["w"])


@pytest.mark.parametrize("empty_first", [True, False])
def test_a_cast_guessed_ahead_goes_to_its_own_tensor_not_an_empty_one_at_the_same_offset(checkpoint, empty_first):
    """An empty tensor's offset is the next tensor's: a guess keyed by (file, offset) must
    not hand one's result to the other, whichever was guessed and whichever asked first."""
    path, tensors, refs = checkpoint
    sharing = [name for name, ref in refs.items() if name != "empty" and ref.offset == refs["empty"].offset]
    assert sharing, "the fixture has no tensor at the empty tensor's offset"
    guessed = ["empty"] + sharing if empty_first else sharing + ["empty"]
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=None)
    try:
        engine.prepare([path])
        engine.cast_ahead([refs[name] for name in guessed], torch.float16)
        got = {name: engine.submit(refs[name], torch.float16).result() for name in reversed(guessed)}
    finally:
        engine.close()
    for name, tensor in got.items():
        assert tensor.shape == tensors[name].shape and _bits(tensor) == _bits(tensors[name].to(torch.float16)), name
