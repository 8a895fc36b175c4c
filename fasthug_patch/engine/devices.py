"""The device side of host-to-device streaming, behind a small interface.

``CudaBackend`` is the only code that touches CUDA: pinned host buffers, one side stream
per device, asynchronous copies and casts on that stream, and events. ``StandInBackend``
implements the same interface on the CPU, with a real asynchronous "stream" (one worker
thread that runs the enqueued operations in order, optionally slowly), so the pipeline's
scheduling, slot reuse, ordering, casts and error paths run and are tested on machines
without a GPU: reusing a staging slot before its event fired corrupts a stand-in load just
as it would a CUDA one.
"""

from __future__ import annotations

import queue
import threading
import time


class CudaBackend:
    """One CUDA device: its side stream, pinned host memory, events."""

    def __init__(self, device, blocking_events: bool = True) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        self.torch = torch
        self.device = cuda_device(device)
        self.key = str(self.device)
        self._stream = torch.cuda.Stream(device=self.device)
        # Blocking-sync events: a reader waiting for a slot sleeps instead of spinning a core
        # that another reader needs for its preadv.
        self._blocking = blocking_events

    def host_buffer(self, nbytes: int):
        return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)

    def device_empty(self, shape, dtype, stride=None):
        if stride is not None:
            return self.torch.empty_strided(shape, stride, dtype=dtype, device=self.device)
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def follow_current(self) -> None:
        """Order the side stream after the caller's current stream: a destination just
        allocated there may reuse a block that stream's queued work still reads."""
        self._stream.wait_stream(self.torch.cuda.current_stream(self.device))

    def enqueue(self, fn) -> None:
        """Run ``fn()`` (which issues kernels/copies) with the side stream current."""
        with self.torch.cuda.stream(self._stream):
            fn()

    def copy(self, dst, src) -> None:
        dst.copy_(src, non_blocking=True)

    def record(self):
        event = self.torch.cuda.Event(blocking=self._blocking)
        event.record(self._stream)
        return event

    def synchronize(self) -> None:
        self._stream.synchronize()

    def register(self, address: int, nbytes: int) -> bool:
        """Pin [address, address+nbytes) of already-mapped memory for DMA, read-only. Give it
        a shared mapping: the kernel unshares (copies) pinned pages of a private one
        (mapped.SharedReadMapping says what that cost)."""
        err = self.torch.cuda.cudart().cudaHostRegister(address, nbytes, _HOST_REGISTER_READ_ONLY)
        return int(getattr(err, "value", err)) == 0

    def unregister(self, address: int) -> None:
        self.torch.cuda.cudart().cudaHostUnregister(address)


_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly


class _StandInEvent:
    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def synchronize(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


class StandInBackend:
    """The CPU pretending to be a device. ``delay`` seconds are slept before every
    enqueued operation, so a test can make the "device" lag far behind the readers."""

    def __init__(self, delay: float = 0.0, name: str = "standin:0") -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cpu")
        self.key = name
        self.delay = delay
        self.operations = 0  # enqueued so far (tests count them)
        self.registered: dict[int, int] = {}  # address -> bytes "pinned"
        self.can_register = True
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"fasthug-{name}", daemon=True)
        self._thread.start()

    def host_buffer(self, nbytes: int):
        return self.torch.empty(nbytes, dtype=self.torch.uint8)

    def device_empty(self, shape, dtype, stride=None):
        if stride is not None:
            return self.torch.empty_strided(shape, stride, dtype=dtype)
        return self.torch.empty(shape, dtype=dtype)

    def follow_current(self) -> None:
        pass

    def enqueue(self, fn) -> None:
        with self._lock:
            self.operations += 1
        self._queue.put(fn)

    def copy(self, dst, src) -> None:
        self._check_one_registration(src)
        dst.copy_(src)

    def _check_one_registration(self, src) -> None:
        """A copy from pinned-in-place memory must lie in one registration (CUDA would
        treat a source straddling two as pageable memory): fail it here as a bug."""
        if not src.numel() or src.device.type != "cpu":
            return
        begin = src.data_ptr()
        end = begin + src.numel() * src.element_size()
        for address, nbytes in list(self.registered.items()):
            if address <= begin < address + nbytes and end > address + nbytes:
                raise RuntimeError(f"copy source [{begin:#x}, {end:#x}) leaves its registration "
                                   f"[{address:#x}, {address + nbytes:#x})")

    def record(self) -> _StandInEvent:
        event = _StandInEvent()
        self._queue.put(event)
        return event

    def synchronize(self) -> None:
        self.record().synchronize()

    def register(self, address: int, nbytes: int) -> bool:
        if self.can_register:
            self.registered[address] = nbytes
        return self.can_register

    def unregister(self, address: int) -> None:
        self.registered.pop(address, None)

    def _run(self) -> None:
        failed: BaseException | None = None
        while True:
            item = self._queue.get()
            if isinstance(item, _StandInEvent):
                item.error = failed
                item._done.set()
                continue
            if self.delay:
                time.sleep(self.delay)
            try:
                item()
            except BaseException as exc:  # noqa: BLE001 - a failed "kernel" poisons later events, like CUDA's sticky errors
                failed = failed or exc


_backends: dict[str, object] = {}
_backends_lock = threading.Lock()


def cuda_device(device):
    """``device`` as a torch.device with its index ("cuda" -> "cuda:<current>")."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"no streaming backend for device {device}")
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


def backend_for(device):
    """The process-wide backend for a CUDA ``device`` (one side stream per device)."""
    device = cuda_device(device)
    with _backends_lock:
        backend = _backends.get(str(device))
        if backend is None:
            backend = _backends[str(device)] = CudaBackend(device)
        return backend
