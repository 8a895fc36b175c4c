"""bitsandbytes on the fast path: the stock quantisation, its kernels run in parallel pieces.

On the fly (``load_in_8bit`` / ``load_in_4bit`` over a full-precision checkpoint) stock
transformers quantises each weight on one thread, one whole tensor at a time, and its CPU
kernels are chains of torch ops over the whole tensor: every step allocates and writes a
fresh tensor of the weight's size (measured 80-115 ms per 2048x5632 weight for int8 on the
reference VM, most of it first writes to fresh memory).

Both bitsandbytes quantisations are local by definition of their formats:
``int8_vectorwise_quant`` scales each row by that row's absmax, and ``quantize_4bit``
each block of ``blocksize`` consecutive elements by that block's absmax, packing pairs of
4-bit codes. So the same kernel run on whole rows (8-bit) or whole, even runs of blocks
(4-bit) returns exactly the corresponding slices of its output on the whole tensor.
``chunked_kernels()`` is a torch dispatch mode, active only while stock's quantize op
converts one weight on the loading thread: it answers those two ops by calling the very
same op on pieces of about a million elements, spread over the cores, and joining the
pieces. Every other op, and everything bitsandbytes and transformers do around the kernel
(the fp16 cast, Int8Params / Params4bit, the QuantState, double quantisation of the
absmax), runs as stock. Pieces stay in the CPU's cache, so the op's temporaries are
reused instead of faulted in fresh (int8: 24 ms against 80-115 ms per weight).

If a piece fails, the op is run whole, as stock would run it: stock's result or stock's
error, never a mixture. tests/test_quant.py checks the pieces against the whole op.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

from fasthug_patch import thread_modes

# bitsandbytes releases whose quantize ops (and transformers' use of them) the parity tests
# have checked: (first, last) minor, inclusive.
BNB_VERIFIED = ((0, 50), (0, 50))
# About this many elements per piece. Measured on the 2-core reference VM for a 2048x5632
# bf16 weight: int8 24 ms at 512 rows (1M elements), 33 ms at 128, 150 ms at 8, where
# per-op overhead dominates; 4-bit 88 ms at 256K elements, 91 ms at 1M, 317 ms at 64K.
INT8_PIECE_ELEMENTS = 1 << 20
FOUR_BIT_PIECE_ELEMENTS = 1 << 18


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_holders = 0


def bnb_version() -> str | None:
    """The installed bitsandbytes version, read without importing it."""
    try:
        return metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None


def bnb_verified(version: str | None) -> bool:
    if not version:
        return False
    from fasthug_patch.capabilities import version_tuple

    low, high = BNB_VERIFIED
    return low <= version_tuple(version) <= high


def verified_span() -> str:
    (a, b), (c, d) = BNB_VERIFIED
    return f"{a}.{b}" if (a, b) == (c, d) else f"{a}.{b} to {c}.{d}"


@contextlib.contextmanager
def quantize_pool():
    """The quantize workers, one per core (the kernels are compute, not I/O), shared by
    whoever holds them (a quantising load, from start to end, or a single op) and shut
    down when the last holder is done.

    Not kept between loads: idle threads that ran torch ops slow the user's model down
    afterwards (most likely because each keeps an OpenMP team, and with more OpenMP threads
    alive than cores libgomp stops spinning at its barriers, so every parallel op pays a
    futex wake-up). Measured on the 2-core VM, a 1b model quantised to int8 on the fly:
    forward 0.41 s with the pool kept, 0.27-0.30 s once it was shut down, and 0.29-0.31 s
    after stock's load."""
    global _pool, _pool_holders
    with _pool_lock:
        if _pool is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            _pool = ThreadPoolExecutor(max_workers=max(1, cores or 1), thread_name_prefix="fasthug-quant")
        _pool_holders += 1
        pool = _pool
    try:
        yield pool
    finally:
        with _pool_lock:
            _pool_holders -= 1
            idle = _pool if _pool_holders == 0 else None
            if idle is not None:
                _pool = None
        if idle is not None:
            idle.shutdown(wait=True)


def with_chunked_kernels(convert, release_source=None):
    """``convert`` (a stock quantize op's bound method) run under chunked_kernels(). Then,
    if given, ``release_source(tensor)`` for each full-precision input the result does not
    share memory with: the input's only use is over, and a zero-copy view of the checkpoint
    would otherwise keep its pages in the process until the load ends (a 1b int8 load held
    the whole 2.2 GB checkpoint beside the 1.3 GB quantised model)."""

    @functools.wraps(convert)
    def chunked_convert(input_dict, *args, **kwargs):
        with chunked_kernels():
            result = convert(input_dict, *args, **kwargs)
        if release_source is not None:
            release_unless_kept(input_dict, result, release_source)
        return result

    return chunked_convert


def release_unless_kept(inputs, results, release_source) -> None:
    """``release_source(tensor)`` for each tensor of ``inputs`` that no tensor of
    ``results`` shares memory with (either may be a tensor, or a dict, list or tuple of
    them, nested): quantising it is over, and only a result that kept its memory still
    needs it."""
    import torch

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (dict, list, tuple)):
            for item in value.values() if isinstance(value, dict) else value:
                yield from tensors(item)

    kept = {t.untyped_storage().data_ptr() for t in tensors(results)}
    for tensor in tensors(inputs):
        if tensor.untyped_storage().data_ptr() not in kept:
            release_source(tensor)


def chunked_kernels():
    """A torch dispatch mode (thread-local, like every dispatch mode) that answers
    bitsandbytes' two quantize kernels piecewise; every other op passes through."""
    return _mode_class()()


@functools.lru_cache(maxsize=None)
def _mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode  # here: importing this module stays light

    class ChunkedKernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            pieces = _PIECEWISE.get(str(func))
            result = None
            if pieces is not None:
                try:
                    result = pieces(func, *args, **kwargs)
                except Exception:  # noqa: BLE001 - the whole op decides: stock's result or stock's error
                    result = None
            return func(*args, **kwargs) if result is None else result

    return ChunkedKernels


def _run_pieces(job, starts) -> list:
    with quantize_pool() as pool:  # within a load: the load's pool; alone: one for this op
        return [future.result() for future in [pool.submit(job, start) for start in starts]]


def int8_rows_in_pieces(func, A, threshold=0.0):
    """``func(A, threshold)`` (int8_vectorwise_quant) on runs of whole rows, joined; None
    where the op is not row-local (an outlier threshold looks across rows) or too small."""
    import torch

    if threshold != 0.0 or A.device.type != "cpu" or A.dim() != 2 or not A.is_contiguous():
        return None
    rows, cols = A.shape
    per = max(1, INT8_PIECE_ELEMENTS // max(1, cols))
    if rows < 2 * per:
        return None
    with thread_modes.callers_modes_off():  # on the CPU, plain: the pool's threads write it
        out = torch.empty((rows, cols), dtype=torch.int8)

    def piece(r0: int):
        r1 = min(rows, r0 + per)
        out_rows, row_stats, outlier_cols = func(A[r0:r1], threshold)
        if outlier_cols is not None or out_rows.dtype != torch.int8:
            raise ValueError("int8_vectorwise_quant returned outliers or a new dtype")
        out[r0:r1].copy_(out_rows)
        return row_stats

    stats = torch.cat(_run_pieces(piece, range(0, rows, per)))
    return thread_modes.as_made_here(out), stats, None  # as the whole op makes it here


def blocks_4bit_in_pieces(func, A, blocksize, quant_type, quant_storage):
    """``func(A, blocksize, quant_type, quant_storage)`` (quantize_4bit) on runs of whole
    blocks, joined; each piece but the last holds a whole number of blocks, an even number
    of elements (codes are packed in pairs) and whole storage words."""
    import torch

    if A.device.type != "cpu" or not A.is_contiguous():
        return None
    flat = A.reshape(-1)
    n = flat.numel()
    word = torch.empty((), dtype=quant_storage).element_size()
    unit = 2 * blocksize * word  # elements per whole number of blocks and storage words
    per = max(unit, FOUR_BIT_PIECE_ELEMENTS // unit * unit)
    if n < 2 * per:
        return None
    bounds = _4bit_bounds(quant_type)

    def piece(start: int):
        part = flat[start : start + per]
        whole = part.numel() == per  # the last piece may hold a partial block: the op does it
        result = _4bit_piece(part, blocksize, bounds, quant_storage) if whole and bounds is not None else None
        return result if result is not None else func(part, blocksize, quant_type, quant_storage)

    parts = _run_pieces(piece, range(0, n, per))
    return torch.cat([packed for packed, _ in parts]), torch.cat([absmax for _, absmax in parts])


def _4bit_bounds(quant_type):
    """The kernel's own bucket bounds (midpoints of the sorted code) and code order, as
    0-dim fp32 tensors so comparisons stay in fp32; None if this bitsandbytes hides them."""
    import torch

    try:
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

        bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    except Exception:  # noqa: BLE001 - then the op itself runs on every piece
        return None
    if bounds.dtype != torch.float32 or bounds.dim() != 1 or not bool((bounds[1:] > bounds[:-1]).all()):
        return None
    return [bounds[i] for i in range(bounds.numel())], (None if quant_type == "nf4" else order)


def _4bit_piece(part, blocksize: int, bounds, quant_storage):
    """bitsandbytes 0.50's default quantize_4bit kernel for a piece of whole blocks, step
    for step into this thread's scratch buffers, except ``torch.bucketize(scaled, bounds)``:
    for sorted bounds and any number that is not NaN, the bucket is the count of bounds
    below it, and 15 compares in the cache beat the branchy binary search (a 2048x5632
    weight: about 90 ms against 150 ms with the op in pieces, 180-310 ms whole).
    A piece holding a NaN (a NaN or inf weight) returns None and goes to the op whole."""
    import torch

    limits, order = bounds
    wide, scaled, above, codes = _scratch(part.numel())
    wide.copy_(part)  # the kernel's A.float(): exact
    blocks, scaled_blocks = wide.view(-1, blocksize), scaled.view(-1, blocksize)
    torch.abs(blocks, out=scaled_blocks)
    absmax = scaled_blocks.max(dim=-1)[0]
    torch.mul(blocks, 1.0 / absmax.clamp(min=1e-38).view(-1, 1), out=scaled_blocks)
    torch.clamp(scaled, -1, 1, out=scaled)
    if bool(torch.isnan(scaled).any()):
        return None
    codes.zero_()
    for limit in limits:
        torch.gt(scaled, limit, out=above)
        codes.add_(above)
    if order is not None:  # fp4's code is not sorted: map the bucket to its code, as the kernel does
        codes = order[codes.long()].to(torch.uint8)
    packed = ((codes[::2] << 4) | codes[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


_scratch_local = threading.local()


def _scratch(n: int):
    """Per-thread buffers for a piece (fp32 x2, bool, uint8), reused across pieces and loads
    so the kernel writes warm memory instead of faulting in fresh pages each time."""
    import torch

    buffers = getattr(_scratch_local, "buffers", None)
    if buffers is None or buffers[0].numel() < n:
        fp32 = torch.float32  # named: the kernel's A.float() is fp32 whatever the default dtype
        buffers = _scratch_local.buffers = (torch.empty(n, dtype=fp32), torch.empty(n, dtype=fp32),
                                            torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.uint8))
    return [buffer[:n] for buffer in buffers]


_PIECEWISE = {
    "bitsandbytes.int8_vectorwise_quant.default": int8_rows_in_pieces,
    "bitsandbytes.quantize_4bit.default": blocks_4bit_in_pieces,
}
