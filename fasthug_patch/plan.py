"""What the checkpoint holds: tensor locations read from safetensors headers.

A safetensors file is ``u64 header_len | JSON header | data``; the header maps each tensor
name to its dtype, shape and ``[begin, end)`` byte range inside ``data``. Validation follows
safetensors' own rules (ranges contiguous, in order, covering the data exactly), so a file
this module accepts is one safetensors accepts too, and every error names the file and,
where there is one, the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass

from fasthug_patch.errors import CheckpointError

# safetensors dtype string -> (torch dtype attribute name, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

# A header larger than this is not a model header (safetensors caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorRef:
    """One tensor inside one safetensors file; ``offset`` is absolute in the file."""

    file: str
    name: str
    dtype_name: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return SAFETENSORS_DTYPES[self.dtype_name][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def aligned(self) -> bool:
        """Its offset is a multiple of its item size, so its bytes can be viewed as its
        dtype in a page-aligned mapping or buffer (an unaligned one is copied out first)."""
        return self.nbytes == 0 or self.offset % self.itemsize == 0

    def torch_dtype(self):
        import torch

        return getattr(torch, SAFETENSORS_DTYPES[self.dtype_name][0])


@dataclass(frozen=True)
class SafetensorsHeader:
    file: str
    file_size: int
    data_start: int
    metadata: dict
    tensors: dict[str, TensorRef]
    # (st_dev, st_ino, st_size, st_mtime_ns) of the file the header was read from; see
    # CheckpointIndex.check_unchanged. Empty for headers parsed from bytes.
    identity: tuple = ()


def read_safetensors_header(path: str) -> SafetensorsHeader:
    """Parse and validate one safetensors header. Raises CheckpointError naming the file."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            file_size = stat.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, None, f"file is {file_size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > file_size - 8:
                raise CheckpointError(
                    path, None, f"header length {header_len} exceeds the file ({file_size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(path, None, f"cannot read: {exc}") from exc
    header = parse_safetensors_header(path, raw, file_size)
    return dataclasses.replace(header, identity=_identity(stat))


def _identity(stat: os.stat_result) -> tuple:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def parse_safetensors_header(path: str, raw: bytes, file_size: int) -> SafetensorsHeader:
    """Validate header bytes ``raw`` of a file of ``file_size`` bytes (pure, fuzzable)."""
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, None, f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(path, None, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, None, "__metadata__ must map strings to strings")

    tensors = {name: _tensor_ref(path, name, entry, data_start) for name, entry in header.items()}
    _check_layout(path, tensors, file_size - data_start, data_start)
    return SafetensorsHeader(path, file_size, data_start, metadata, tensors)


def _tensor_ref(path: str, name: str, entry, data_start: int) -> TensorRef:
    if not isinstance(entry, dict):
        raise CheckpointError(path, name, "entry is not an object")
    dtype_name = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(path, name, f"unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(path, name, f"invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(path, name, f"invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype_name][1]
    if end < begin or end - begin != expected:
        raise CheckpointError(
            path, name, f"data_offsets {offsets} hold {end - begin} bytes, shape {shape} needs {expected}"
        )
    return TensorRef(path, name, dtype_name, tuple(shape), data_start + begin, end - begin)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(path: str, tensors: dict[str, TensorRef], data_len: int, data_start: int) -> None:
    """Ranges must tile the data region exactly, as safetensors requires."""
    position = data_start
    for ref in sorted(tensors.values(), key=lambda r: (r.offset, r.nbytes)):
        if ref.offset != position:
            kind = "overlaps the previous tensor" if ref.offset < position else "leaves a gap before it"
            raise CheckpointError(path, ref.name, f"byte range {kind}")
        position += ref.nbytes
    if position - data_start != data_len:
        raise CheckpointError(
            path,
            None,
            f"tensors cover {position - data_start} bytes but the file holds {data_len} data bytes "
            "(truncated or padded file)",
        )


class CheckpointIndex:
    """Name -> TensorRef over every safetensors file of one load, parsed once per file."""

    def __init__(self) -> None:
        self._headers: dict[str, SafetensorsHeader] = {}

    def add_file(self, path: str) -> SafetensorsHeader:
        path = os.path.realpath(path)
        header = self._headers.get(path)
        if header is None:
            header = read_safetensors_header(path)
            self._headers[path] = header
        return header

    def tensors(self, files: list[str]) -> dict[str, TensorRef]:
        """All tensors of ``files``; a name present in two files is an error (ambiguous)."""
        merged: dict[str, TensorRef] = {}
        for path in files:
            for name, ref in self.add_file(path).tensors.items():
                if name in merged:
                    raise CheckpointError(path, name, f"also present in {merged[name].file}")
                merged[name] = ref
        return merged

    def check_unchanged(self, files: list[str] | None = None) -> None:
        """Raise CheckpointError if a file whose header was read (of ``files``, or any) was
        since replaced or rewritten. The engine maps files by path after their headers were
        read here; a file replaced in between (say by a download finishing under the same
        name) would put this header's offsets over another file's bytes: a wrong model,
        silently. Called once the weights are materialised, so a file that is unchanged now
        was unchanged when it was mapped."""
        paths = self._headers if files is None else [os.path.realpath(f) for f in files]
        for path in paths:
            header = self._headers.get(path)
            if header is None or not header.identity:
                continue
            try:
                now = _identity(os.stat(path))
            except OSError as exc:
                raise CheckpointError(path, None, f"vanished while it was being loaded ({exc})") from exc
            if now != header.identity:
                raise CheckpointError(path, None, "was replaced or modified while it was being loaded")

    @property
    def total_bytes(self) -> int:
        return sum(h.file_size for h in self._headers.values())
