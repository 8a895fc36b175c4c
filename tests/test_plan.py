"""The safetensors header parser: every malformed header is a CheckpointError naming the
file (and tensor), and whatever it accepts, safetensors accepts too (fuzzed)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from fasthug_patch.errors import CheckpointError
from fasthug_patch.plan import CheckpointIndex, parse_safetensors_header, read_safetensors_header


def _write(path, header: dict, data: bytes, header_len: int | None = None) -> str:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return str(path)


def test_reads_a_real_file(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(5, dtype=torch.bfloat16)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert header.metadata == {"format": "pt"}
    assert {n: (r.dtype_name, r.shape) for n, r in header.tensors.items()} == {"a": ("F32", (2, 3)), "b": ("BF16", (5,))}
    with open(path, "rb") as f:
        blob = f.read()
    ref = header.tensors["a"]
    assert torch.frombuffer(bytearray(blob[ref.offset : ref.offset + ref.nbytes]), dtype=torch.float32).tolist() == list(
        range(6)
    )


@pytest.mark.parametrize(
    "header, data, header_len, problem",
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**9, "header length"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12, None, "overlaps",
        ),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "gap"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, None, "padded"),
        ({"t": [1, 2]}, b"", None, "not an object"),
    ],
)
def test_malformed_headers_name_the_file_and_tensor(tmp_path, header, data, header_len, problem):
    path = _write(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError) as info:
        read_safetensors_header(path)
    assert path in str(info.value) and problem in str(info.value)
    if "t" in header and problem not in ("header length", "truncated", "padded", "gap"):
        assert info.value.tensor in ("t", "u")


def test_corrupt_json_and_tiny_file(tmp_path):
    path = tmp_path / "j.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_safetensors_header(str(path))
    short = tmp_path / "s.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors_header(str(short))


def test_zero_size_and_scalar_tensors(tmp_path):
    path = str(tmp_path / "z.safetensors")
    save_file({"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}, path)
    refs = read_safetensors_header(path).tensors
    assert refs["empty"].shape == (0, 3) and refs["empty"].nbytes == 0
    assert refs["scalar"].shape == () and refs["scalar"].nbytes == 4


def test_same_name_in_two_files_is_an_error(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_file({"w": torch.ones(2)}, a)
    save_file({"w": torch.zeros(2)}, b)
    with pytest.raises(CheckpointError, match="also present"):
        CheckpointIndex().tensors([a, b])


DTYPES = ["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "Q8"]
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 96), min_size=0, max_size=3),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.dictionaries(st.text(min_size=1, max_size=4), entries, max_size=4),
    data_len=st.integers(0, 96),
)
def test_fuzz_parser_agrees_with_safetensors(tmp_path, header, data_len):
    """Random headers: we either reject with CheckpointError, or accept a file that
    safetensors also opens with the same tensor names, shapes and dtypes."""
    path = _write(tmp_path / "f.safetensors", header, bytes(range(256))[:data_len] * 1 if data_len < 256 else b"")
    try:
        parsed = read_safetensors_header(path)
    except CheckpointError:
        return
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(parsed.tensors)
        for name, ref in parsed.tensors.items():
            piece = f.get_slice(name)
            assert tuple(piece.get_shape()) == ref.shape and piece.get_dtype() == ref.dtype_name


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), file_size=st.integers(0, 10_000))
def test_fuzz_raw_bytes_never_escape_as_other_errors(raw, file_size):
    try:
        parse_safetensors_header("fuzz.safetensors", raw, file_size)
    except CheckpointError:
        pass
