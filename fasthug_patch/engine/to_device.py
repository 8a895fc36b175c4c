"""Checkpoint bytes (or CPU tensors) -> tensors on a device, through the staging ring.

Per tensor: the destination is allocated on the device in its final dtype; the tensor's
bytes are cut into slot-sized pieces, and for each piece a reader thread takes a ring slot,
reads the bytes into it (``preadv`` from the file for checkpoint tensors, a memcpy for CPU
tensors), and enqueues on the device's side stream the copy into the destination, or, when
the dtype changes, the copy into the slot's device scratch and the cast from there into
the destination. So a half-precision checkpoint crosses the bus at half precision and is
widened on the device, and nothing but the final tensor is allocated per tensor.

A tensor is handed over only when its device work has finished: once its last piece is
enqueued, an event is recorded and one completer thread per streamer waits on the events
in order and completes the Futures. A consumer on any stream sees finished bytes.

Parity with stock: stock's ``tensor.to(device, dtype)`` casts on the CPU, then copies.
Float-to-float casts round the same on the device for every finite value and infinity;
only NaN payloads may differ, so each cast piece also folds ``isnan(src).any()`` into a
device flag, and a tensor that had a NaN is redone the stock way (CPU cast, then copy).
Where stock casts on the device itself (4.57 reading a shard on the GPU), the device's cast
is stock's, NaNs included, and nothing is redone. Casts between other dtypes are done the
stock way from the start.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from concurrent.futures import Future

from fasthug_patch import settings
from fasthug_patch.engine import mapped as mapped_mod
from fasthug_patch.engine.mapped import SharedReadMapping
from fasthug_patch.errors import CheckpointError

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def to_device_as_stock(tensor, device, dtype, stock_casts_on_device=False):
    """What the stock loader does with a tensor bound for ``device`` as ``dtype``: cast on
    the CPU, then copy (5.x's ``.to(device, dtype)``), or copy, then cast on the device
    (4.57 reading a shard on the GPU)."""
    if stock_casts_on_device:
        return tensor.to(device=device).to(dtype=dtype)
    return tensor.to(device=device, dtype=dtype)


def casts_on_device(src_dtype, dst_dtype) -> bool:
    """Whether a cast from ``src_dtype`` to ``dst_dtype`` may run on the device."""
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    return name(src_dtype) in _FLOATS and name(dst_dtype) in _FLOATS


PAGE = mmap.PAGESIZE


class _PinnedFile:
    """A page-cached file's read-only shared mapping, pinned for DMA in chunks (one Future
    per chunk: whether cudaHostRegister took it). Chunks are pinned in parallel, and a
    tensor's copy waits only for the chunks it lies in, so the first DMAs start while the
    rest of the file is still being pinned."""

    def __init__(self, mapping: SharedReadMapping, chunk_bytes: int) -> None:
        self.mapping = mapping
        self.chunk_bytes = max(PAGE, chunk_bytes - chunk_bytes % PAGE)  # registrations never share a page
        self.chunks = [Future() for _ in range(-(-mapping.size // self.chunk_bytes))]

    def span(self, index: int) -> tuple[int, int]:
        start = index * self.chunk_bytes
        return start, min(self.chunk_bytes, self.mapping.size - start)

    def covering(self, offset: int, nbytes: int) -> range:
        return range(offset // self.chunk_bytes, (offset + nbytes - 1) // self.chunk_bytes + 1)

    @staticmethod
    def _outcome(chunk: Future) -> bool | None:
        """Whether cudaHostRegister took ``chunk``; None while it is pending or if it raised."""
        return bool(chunk.result()) if chunk.done() and chunk.exception() is None else None

    def refused(self) -> bool:
        """Whether a chunk was already refused (then the whole file goes through the ring)."""
        return any(self._outcome(c) is False for c in self.chunks)

    def unpin(self, backend) -> None:
        for index, chunk in enumerate(self.chunks):
            if self._outcome(chunk):
                backend.unregister(self.mapping.base + self.span(index)[0])
        self.mapping.close()


class _Job:
    """One tensor on its way to the device."""

    __slots__ = ("dst", "dst_bytes", "dst_flat", "src_dtype", "src_item", "nan_seen", "read_into", "read_whole")

    def __init__(self, dst, src_dtype, read_into, read_whole) -> None:
        self.dst = dst
        flat = dst.reshape(-1)
        self.dst_flat = flat
        self.dst_bytes = flat.view(_uint8()) if dst.dtype == src_dtype else None
        self.src_dtype = src_dtype
        self.src_item = itemsize(src_dtype)
        self.nan_seen = None
        self.read_into = read_into  # (host_uint8, start_byte) -> None
        self.read_whole = read_whole  # () -> CPU tensor of the source (for a stock-way redo)


def _uint8():
    import torch

    return torch.uint8


def itemsize(dtype) -> int:
    """Bytes per element of ``dtype`` (torch 2.0 has no ``dtype.itemsize``)."""
    import torch

    return torch.empty((), dtype=dtype).element_size()


class DeviceStreamer:
    """Streams tensors to one device. ``run(assembly, fn, *args)`` runs a piece on the
    caller's reader pool and reports it to ``assembly`` (Materializer._run)."""

    def __init__(self, backend, ring, run, make_assembly, pin_chunk_bytes: int | None = None) -> None:
        self.backend = backend
        self._ring = ring  # a StagingRing, or a callable making it on first use
        self._run = run
        self._make_assembly = make_assembly
        self._fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()
        self._completions: queue.SimpleQueue = queue.SimpleQueue()
        self._completer = threading.Thread(target=self._complete_in_order, name="fasthug-completer", daemon=True)
        self._completer.start()
        self.tensors = 0
        self.redone_for_nan = 0
        self.tensors_direct = 0  # DMA'd straight from a pinned file mapping
        self._pinned: dict[str, _PinnedFile | None] = {}  # file -> its pinned mapping (None: cannot map)
        self._pin_chunk = pin_chunk_bytes or settings.pin_chunk_bytes()

    @property
    def ring(self):
        if callable(self._ring):
            self._ring = self._ring()  # pinned only when some tensor needs it
        return self._ring

    # -- requests ---------------------------------------------------------------
    def submit_ref(self, ref, dtype, fill=None, stock_casts_on_device=False) -> Future:
        """Checkpoint tensor ``ref`` -> a device tensor of ``dtype`` (None: its own).
        ``stock_casts_on_device``: stock casts it on the device too, NaN payloads and all,
        so a NaN is not a reason to redo the cast on the CPU."""
        src_dtype = ref.torch_dtype()
        dtype = dtype or src_dtype

        def read_into(host, start: int) -> None:
            if fill is not None:
                fill.wait(ref.offset + start, host.numel())  # a cold file's bytes, read in file order
            self._pread(ref, host, start)

        def read_whole():
            import torch

            data = torch.empty(ref.nbytes, dtype=torch.uint8)
            self._pread(ref, data, 0)
            return data.view(src_dtype).view(ref.shape)

        return self._submit(ref.name, tuple(ref.shape), None, src_dtype, dtype, ref.nbytes, read_into, read_whole,
                            stock_casts_on_device)

    def submit_direct(self, ref) -> Future | None:
        """A same-dtype tensor of a file that is in the page cache: DMA'd straight from a
        read-only shared mapping of the file whose pages are pinned in place
        (cudaHostRegister, chunk by chunk on the reader threads), so no byte is copied by a
        CPU. None if the file cannot be pinned (the caller uses the ring)."""
        pinned = self.pin_file(ref.file)
        if pinned is None or pinned.refused():
            return None
        self.tensors += 1
        self.backend.follow_current()
        dst = self.backend.device_empty(tuple(ref.shape), ref.torch_dtype())
        future: Future = Future()
        if ref.nbytes == 0:
            future.set_result(dst)
            return future
        job = _Job(dst, dst.dtype, lambda host, start: self._pread(ref, host, start), None)
        assembly = self._make_assembly(future, dst, 1, ref.name,
                                       lambda: self._completions.put((self.backend.record(), future, job)))
        self._run(assembly, self._direct_copy, job, pinned, ref)
        return future

    def pin_file(self, path: str) -> "_PinnedFile | None":
        """``path``'s pinned mapping, its chunks' pinning queued on the reader pool on first
        call (before any copy that waits for them: the pool is FIFO, so a waiting copy only
        ever waits for a chunk a running thread has taken). None if it cannot be mapped."""
        with self._fds_lock:
            if path not in self._pinned:
                try:
                    mapping = SharedReadMapping(path)
                except CheckpointError:
                    self._pinned[path] = None  # the ring's reads meet (and report) the same problem
                    return None
                pinned = self._pinned[path] = _PinnedFile(mapping, self._pin_chunk)
                for index, chunk in enumerate(pinned.chunks):
                    self._run(self._make_assembly(chunk, None, 1, path, None), self._register, pinned, index)
            return self._pinned[path]

    def _register(self, pinned: "_PinnedFile", index: int) -> None:
        start, length = pinned.span(index)
        pinned.chunks[index].set_result(self.backend.register(pinned.mapping.base + start, length))

    def _direct_copy(self, job: _Job, pinned: "_PinnedFile", ref) -> None:
        chunks = pinned.covering(ref.offset, ref.nbytes)
        if not all(pinned.chunks[index].result() for index in chunks):  # pinning refused: the ring after all
            for start in range(0, ref.nbytes, self.ring.slot_bytes):
                self._piece(job, start, min(self.ring.slot_bytes, ref.nbytes - start))
            return
        src, dst = pinned.mapping.raw_bytes(ref), job.dst_bytes  # raises, naming the tensor, if the file shrank
        # One copy per pinned chunk the tensor lies in: a DMA source must be one registration.
        cuts = [max(pinned.span(index)[0] - ref.offset, 0) for index in chunks] + [ref.nbytes]
        pieces = [(src[a:b], dst[a:b]) for a, b in zip(cuts, cuts[1:])]

        def work():
            for piece_src, piece_dst in pieces:
                self.backend.copy(piece_dst, piece_src)

        self.backend.enqueue(work)
        self.tensors_direct += 1

    def submit_tensor(self, tensor, label: str = "tensor") -> Future:
        """A contiguous CPU tensor -> a device tensor of the same dtype, shape and strides."""
        src_bytes = tensor.reshape(-1).view(_uint8()) if tensor.numel() else None

        def read_into(host, start: int) -> None:
            piece = src_bytes[start : start + host.numel()]
            # Fault the source in from the kernel side first: a weight mapped from a file that
            # shrank since raises here, naming it, instead of a SIGBUS in the copy.
            mapped_mod.populate_address(piece.data_ptr(), piece.numel(), label)
            host.copy_(piece)

        nbytes = tensor.numel() * tensor.element_size()
        return self._submit(label, tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.dtype, nbytes,
                            read_into, lambda: tensor)

    def _submit(self, label, shape, stride, src_dtype, dtype, nbytes, read_into, read_whole,
                stock_casts_on_device=False) -> Future:
        self.tensors += 1
        if not casts_on_device(src_dtype, dtype) and src_dtype != dtype:
            return self._stock_way(read_whole, dtype, stock_casts_on_device)
        self.backend.follow_current()
        dst = self.backend.device_empty(shape, dtype, stride)
        future: Future = Future()
        if nbytes == 0:
            future.set_result(dst)
            return future
        job = _Job(dst, src_dtype, read_into, read_whole)
        if job.dst_bytes is None and not stock_casts_on_device:
            import torch

            job.nan_seen = self.backend.device_empty((), torch.bool)
            self.backend.enqueue(job.nan_seen.zero_)
        pieces = [(start, min(self.ring.slot_bytes, nbytes - start)) for start in range(0, nbytes, self.ring.slot_bytes)]
        assembly = self._make_assembly(future, dst, len(pieces), label,
                                       lambda: self._completions.put((self.backend.record(), future, job)))
        for start, length in pieces:
            self._run(assembly, self._piece, job, start, length)
        return future

    def _stock_way(self, read_whole, dtype, stock_casts_on_device=False) -> Future:
        future: Future = Future()
        try:
            future.set_result(to_device_as_stock(read_whole(), self.backend.device, dtype, stock_casts_on_device))
        except BaseException as exc:  # noqa: BLE001 - the caller's future carries it
            future.set_exception(exc)
        return future

    # -- the pieces (reader threads) ----------------------------------------------
    def _piece(self, job: _Job, start: int, length: int) -> None:
        slot = self.ring.acquire()
        event = None
        try:
            host = slot.host[:length]
            job.read_into(host, start)
            event = self._enqueue(job, slot, host, start, length)
        finally:
            if event is None:
                event = self.backend.record()  # whatever was enqueued must finish before reuse
            self.ring.release(slot, event)

    def _enqueue(self, job: _Job, slot, host, start: int, length: int):
        backend = self.backend
        if job.dst_bytes is not None:  # same dtype: straight into the destination
            dst = job.dst_bytes[start : start + length]
            backend.enqueue(lambda: backend.copy(dst, host))
            return backend.record()
        import torch

        scratch = self.ring.scratch(slot)[:length]
        src = scratch.view(job.src_dtype)
        first = start // job.src_item
        dst = job.dst_flat[first : first + src.numel()]
        flag = job.nan_seen

        def work():
            backend.copy(scratch, host)
            dst.copy_(src)  # the cast, on the device
            if flag is not None:  # None: stock casts on the device too, NaNs and all
                torch.logical_or(flag, torch.isnan(src).any(), out=flag)

        backend.enqueue(work)
        return backend.record()

    # -- completion (one thread) ------------------------------------------------------
    def _complete_in_order(self) -> None:
        while True:
            item = self._completions.get()
            if item is None:
                return
            event, future, job = item
            try:
                event.synchronize()
                if job.nan_seen is not None and bool(job.nan_seen.item()):
                    # stock's way for this one: cast on the CPU, then copy (NaN bits as stock's)
                    job.dst.copy_(job.read_whole().to(job.dst.dtype))
                    self.redone_for_nan += 1
            except BaseException as exc:  # noqa: BLE001 - the waiting caller gets it
                future.set_exception(exc)
                continue
            future.set_result(job.dst)

    # -- files ------------------------------------------------------------------
    def _pread(self, ref, host, start: int) -> None:
        fd = self._fd(ref.file)
        view = memoryview(host.numpy())
        got, want = 0, host.numel()
        while got < want:
            try:
                n = os.preadv(fd, [view[got:]], ref.offset + start + got)
            except OSError as exc:
                raise CheckpointError(ref.file, ref.name, f"read failed: {exc.strerror or exc}") from exc
            if n == 0:
                raise CheckpointError(ref.file, ref.name, f"file ended at byte {ref.offset + start + got}, inside "
                                                          "this tensor (truncated while loading?)")
            got += n

    def _fd(self, path: str) -> int:
        with self._fds_lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise CheckpointError(path, None, f"cannot open: {exc.strerror or exc}") from exc
            return fd

    def close(self) -> None:
        """After the reader pool has drained: finish completions, unpin the files' pages,
        close the files."""
        self._completions.put(None)
        self._completer.join()
        try:
            self.backend.synchronize()
        except Exception:  # noqa: BLE001 - a device error already failed the futures of the work it hit
            pass
        for pinned in self._pinned.values():
            if pinned is not None:
                pinned.unpin(self.backend)
        self._pinned.clear()
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
