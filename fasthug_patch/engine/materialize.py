"""Turn checkpoint tensors into final tensors, in parallel threads.

A request is (source, dtype, device) and returns a Future of the final tensor:
- same dtype on CPU: a zero-copy view of the mapped file, prefaulted in chunks;
- another dtype: a fresh tensor of the target dtype, filled chunk by chunk straight from
  the mapped bytes, so the cast is done once and no intermediate copy exists.
Every request is split into chunks of at most ``chunk_bytes`` that the pool runs in
submission order (which is file order when the caller submits in file order).

torch's copy kernels release the GIL, so plain threads scale to the cores.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from fasthug_patch.engine.mapped import MappedFiles
from fasthug_patch.errors import FastPathError, Unsupported
from fasthug_patch.plan import TensorRef


class _Assembly:
    """Completes ``future`` with ``value`` once all its chunks have run."""

    __slots__ = ("future", "value", "remaining", "lock", "label")

    def __init__(self, future: Future, value, chunks: int, label: str) -> None:
        self.future, self.value, self.remaining, self.label = future, value, chunks, label
        self.lock = threading.Lock()

    def chunk_done(self, error: BaseException | None) -> None:
        with self.lock:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
                return
            self.remaining -= 1
            if self.remaining == 0:
                self.future.set_result(self.value)


class Materializer:
    """One per load; ``close()`` waits for or cancels what is still queued."""

    def __init__(self, threads: int, chunk_bytes: int, populate: bool) -> None:
        self.threads = threads
        self.chunk_bytes = chunk_bytes
        self.populate = populate
        self.files = MappedFiles()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fasthug-reader")
        self._failed: BaseException | None = None
        self._stats_lock = threading.Lock()
        self.bytes_read = 0
        self.tensors_mapped = 0
        self.tensors_cast = 0
        self.busy_seconds = 0.0

    # -- requests -------------------------------------------------------------
    def submit(self, source, dtype=None, device="cpu") -> Future:
        """Schedule ``source`` (a TensorRef or a CPU torch.Tensor) as ``dtype`` on ``device``."""
        if str(device) not in ("cpu", "None"):
            raise Unsupported(f"device {device} is not handled by the CPU materializer")
        if isinstance(source, TensorRef):
            mapped = self.files.get(source.file)
            if (dtype is None or dtype == source.torch_dtype()) and mapped.is_aligned(source):
                return self._mapped_view(mapped, source)
            return self._cast(mapped.tensor(source) if mapped.is_aligned(source) else None, source, dtype, mapped)
        if dtype is None or dtype == source.dtype:
            done: Future = Future()
            done.set_result(source[...])  # what stock hands over: a view of the same storage
            return done
        return self._cast(source, None, dtype, None)

    def _mapped_view(self, mapped, ref: TensorRef) -> Future:
        future: Future = Future()
        view = mapped.tensor(ref)
        with self._stats_lock:
            self.tensors_mapped += 1
            self.bytes_read += ref.nbytes
        if not self.populate or ref.nbytes == 0:
            future.set_result(view)
            return future
        spans = _spans(ref.nbytes, self.chunk_bytes)
        assembly = _Assembly(future, view, len(spans), ref.name)
        for start, length in spans:
            self._run(assembly, mapped.populate, ref, start, length)
        return future

    def _cast(self, src, ref: TensorRef | None, dtype, mapped) -> Future:
        import torch

        future: Future = Future()
        if src is None:  # unaligned bytes: read them into an aligned buffer first
            src = _read_unaligned(mapped, ref)
        dtype = dtype or src.dtype
        label = ref.name if ref is not None else "tensor"
        dst = torch.empty(src.shape, dtype=dtype)
        with self._stats_lock:
            self.tensors_cast += 1
            self.bytes_read += src.numel() * src.element_size()
        if src.numel() == 0:
            future.set_result(dst)
            return future
        src_flat, dst_flat = src.reshape(-1), dst.view(-1)
        per_chunk = max(1, self.chunk_bytes // max(dst.element_size(), src.element_size()))
        spans = _spans(src_flat.numel(), per_chunk)
        assembly = _Assembly(future, dst, len(spans), label)
        for start, count in spans:
            self._run(assembly, _copy_span, dst_flat, src_flat, start, count)
        return future

    # -- execution ------------------------------------------------------------
    def _run(self, assembly: _Assembly, fn, *args) -> None:
        def job():
            if self._failed is not None or assembly.future.done():
                assembly.chunk_done(self._failed or FastPathError("cancelled"))
                return
            began = time.perf_counter()
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                self._failed = self._failed or exc
                assembly.chunk_done(exc)
                return
            finally:
                with self._stats_lock:
                    self.busy_seconds += time.perf_counter() - began
            assembly.chunk_done(None)

        self._pool.submit(job)

    def close(self, cancel: bool = False) -> None:
        if cancel and self._failed is None:
            self._failed = FastPathError("load abandoned")
        self._pool.shutdown(wait=True, cancel_futures=cancel)


def _spans(total: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(step, total - start)) for start in range(0, total, step)]


def _copy_span(dst_flat, src_flat, start: int, count: int) -> None:
    dst_flat[start : start + count].copy_(src_flat[start : start + count])


def _read_unaligned(mapped, ref: TensorRef):
    return mapped.raw_bytes(ref).clone().view(ref.torch_dtype()).view(ref.shape)
