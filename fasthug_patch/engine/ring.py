"""A bounded ring of staging slots between the reader threads and one device.

Each slot is a pinned host buffer (the only memory a DMA copy runs at full speed from) and,
once a cast needs one, a device scratch buffer of the same size. A reader takes a free slot,
fills it, enqueues the copy (and cast) on the device's side stream and gives the slot back
with the event recorded after that work; the next taker waits on the event before it
overwrites the slot. So host memory stays at ``slots x slot_bytes`` however large the
model, and the device memory used beyond the model's own is at most the same again.

One ring per device per process, allocated on first use and kept: pinning memory costs far
more than reusing it (cudaHostAlloc maps and locks every page).
"""

from __future__ import annotations

import atexit
import queue
import threading

from fasthug_patch import settings
from fasthug_patch.engine import devices


class Slot:
    __slots__ = ("index", "host", "scratch", "event")

    def __init__(self, index: int, host) -> None:
        self.index = index
        self.host = host  # uint8, slot_bytes
        self.scratch = None  # uint8 on the device, made on first cast
        self.event = None  # recorded after the last device work that read this slot


class StagingRing:
    def __init__(self, backend, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 4096:
            raise ValueError(f"a staging ring needs at least 1 slot of 4 KiB (got {slots} x {slot_bytes})")
        self.backend = backend
        self.slot_bytes = slot_bytes - slot_bytes % 64  # every dtype's element size divides it
        self.slots = slots
        block = backend.host_buffer(self.slots * self.slot_bytes)  # one pinned allocation
        self._all = [Slot(i, block[i * self.slot_bytes : (i + 1) * self.slot_bytes]) for i in range(slots)]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in self._all:
            self._free.put(slot)
        self._scratch_lock = threading.Lock()

    def acquire(self) -> Slot:
        """A free slot whose earlier device work has finished (blocks until there is one)."""
        slot = self._free.get()
        if slot.event is not None:
            try:
                slot.event.synchronize()
            except BaseException:
                self._free.put(slot)
                raise
            slot.event = None
        return slot

    def release(self, slot: Slot, event=None) -> None:
        slot.event = event
        self._free.put(slot)

    def scratch(self, slot: Slot):
        """The slot's device scratch buffer (allocated on first use)."""
        if slot.scratch is None:
            with self._scratch_lock:
                if slot.scratch is None:
                    import torch

                    slot.scratch = self.backend.device_empty((self.slot_bytes,), torch.uint8)
        return slot.scratch


_rings: dict[str, StagingRing] = {}
_rings_lock = threading.Lock()


def shared_ring(backend) -> StagingRing:
    """The process's ring for ``backend``'s device, sized by FASTHUG_RING (slots x MiB)."""
    with _rings_lock:
        ring = _rings.get(backend.key)
        if ring is None:
            slots, slot_bytes = settings.ring_shape()
            ring = _rings[backend.key] = StagingRing(backend, slots, slot_bytes)
        return ring


def cuda_devices(device_map) -> set[str]:
    """The CUDA devices ("cuda:N") that ``device_map`` names; empty where CUDA is not
    available. Never raises."""
    try:
        import torch

        if not torch.cuda.is_available():
            return set()
        names = set()
        values = device_map.values() if isinstance(device_map, dict) else [device_map]
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool):
                value = torch.device("cuda", value)  # an index is a CUDA device in a device map
            elif str(value) in ("auto", "balanced", "balanced_low_0", "sequential"):
                value = "cuda"  # the current device
            elif not str(value).startswith("cuda"):
                continue
            names.add(str(devices.cuda_device(value)))
        return names
    except Exception:  # noqa: BLE001 - a warm-up only
        return set()


# How long the interpreter's exit waits for a ring warm-up still running (pinning a few
# hundred MiB takes tens of milliseconds; a stuck driver call must not hang the exit).
WARMUP_JOIN_SECONDS = 10.0
_warmups: list[threading.Thread] = []
_warmups_lock = threading.Lock()


def warm_async(names) -> None:
    """Start allocating the rings of the CUDA devices ``names`` (cuda_devices), in a
    background thread, so pinning the ring overlaps stock building the model."""
    for name in names:
        thread = threading.Thread(target=_warm, args=(name,), name="fasthug-ring-warmup", daemon=True)
        with _warmups_lock:
            _warmups[:] = [t for t in _warmups if t.is_alive()]
            _warmups.append(thread)
        thread.start()


def _warm(device: str) -> None:
    try:
        shared_ring(devices.backend_for(device))
    except Exception:  # noqa: BLE001 - the load itself will meet (and handle) the same problem
        pass


@atexit.register
def join_warmups(timeout: float = WARMUP_JOIN_SECONDS) -> None:
    """Wait for warm-ups still running. At exit, so that none is inside a CUDA call when
    the interpreter stops its daemon threads: the thread would be ended on its way back
    through pybind11's GIL guard, which is noexcept, and the process would abort
    ("terminate called without an active exception"). A load that uses its ring waits for
    the warm-up anyway; this covers one that did not (it fell back to stock, or failed)."""
    with _warmups_lock:
        pending = list(_warmups)
    for thread in pending:
        thread.join(timeout)
