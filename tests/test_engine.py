"""The materializer: zero-copy views, chunked casts equal to torch's own, errors, cleanup."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

from fasthug_patch.engine import Materializer
from fasthug_patch.engine.mapped import MappedFile
from fasthug_patch.errors import CheckpointError
from fasthug_patch.plan import CheckpointIndex


def _special_values(n: int, dtype) -> torch.Tensor:
    torch.manual_seed(0)
    values = torch.randn(n, dtype=torch.float32) * 1e3
    values[:8] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 65504.0, 1e38])
    return values.to(dtype)


@pytest.fixture()
def checkpoint(tmp_path):
    tensors = {
        "bf16": _special_values(10_001, torch.bfloat16).view(73, 137),
        "fp32": _special_values(4_099, torch.float32),
        "fp16": _special_values(3_001, torch.float16),
        "int": torch.arange(77, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.25),
    }
    path = str(tmp_path / "c.safetensors")
    save_file(tensors, path)
    return path, tensors, CheckpointIndex().tensors([path])


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("chunk", [64, 1 << 20])
@pytest.mark.parametrize("target", [None, torch.float32, torch.bfloat16, torch.float16])
def test_results_equal_torch_casts_bitwise(checkpoint, chunk, target):
    _, tensors, refs = checkpoint
    engine = Materializer(threads=3, chunk_bytes=chunk, populate=True)
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
        mapped.tensor(refs["w"])
    assert path in str(info.value) and "'w'" in str(info.value)
    with pytest.raises(CheckpointError, match="could not be read"):
        mapped.populate(refs["w"], 0, refs["w"].nbytes)  # EFAULT, not SIGBUS


def test_error_in_a_chunk_fails_the_future_and_close_returns(checkpoint, monkeypatch):
    _, _, refs = checkpoint
    engine = Materializer(threads=2, chunk_bytes=64, populate=True)
    import fasthug_patch.engine.materialize as materialize

    calls = {"n": 0}
    real = materialize._copy_span

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        return real(*args)

    monkeypatch.setattr(materialize, "_copy_span", flaky)
    future = engine.submit(refs["bf16"], torch.float32)
    with pytest.raises(OSError, match="disk went away"):
        future.result(timeout=30)
    later = engine.submit(refs["fp32"], torch.float16)  # queued after the failure: cancelled
    with pytest.raises(Exception):
        later.result(timeout=30)
    engine.close(cancel=True)
    assert not [t for t in threading.enumerate() if t.name.startswith("fasthug-reader")]


def test_no_leaked_threads_or_descriptors(checkpoint):
    _, _, refs = checkpoint
    fds_before = len(os.listdir("/proc/self/fd"))
    engine = Materializer(threads=4, chunk_bytes=128, populate=True)
    results = [engine.submit(ref, torch.float16 if ref.dtype_name.startswith(("F", "B")) else None) for ref in refs.values()]
    [f.result() for f in results]
    engine.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the map keeps no descriptor open
    assert not [t for t in threading.enumerate() if t.name.startswith("fasthug-reader")]
