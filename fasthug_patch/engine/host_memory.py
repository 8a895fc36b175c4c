"""Fresh CPU memory for weights the load writes (casts), backed by transparent huge pages.

A cast writes every byte of its result into memory nobody has touched yet, and with
4 KiB pages that is one page fault per 4 KiB: for a 1B model cast bf16 -> fp32 (4.4 GB)
about a million faults. torch's CPU allocator asks for huge pages only when
``THP_MEM_ALLOC_ENABLE`` was set before its first allocation, so with FASTHUG_HUGE_PAGES=1
weights the engine casts get their own anonymous mapping, aligned to 2 MiB and marked
MADV_HUGEPAGE: one fault per 2 MiB.

Opt-in, because it depends on who backs the memory. Measured on the 2-core reference VM
(Firecracker, whose balloon has free page reporting: memory the guest frees in large
blocks is handed back to the host, and touching it again faults on the host side):
- memory the host still backs: first write of 4.4 GB 0.27-0.85 s with huge pages against
  0.86-1.02 s with 4 KiB pages; a fp32 -> bf16 cast of a 1B checkpoint 0.28-0.46 s
  against 0.65-1.16 s;
- in the bench suite, where huge pages come from reported blocks: S3 (fp32 -> bf16, 1B)
  2.84 s against stock's 1.10 s, D4 on 4.57 4.17 s against 1.91 s. 4 KiB allocations
  mostly reuse recently freed pages that were never reported.
On a machine without free page reporting (bare metal, most hypervisors without a
reporting balloon) the first case is the one that applies.

The tensor owns its mapping (torch.frombuffer keeps it alive); it is unmapped when the
last tensor over it is freed, like any other storage. Small tensors, a kernel without
transparent huge pages (mode "never"), or the setting off get plain torch.empty.

Whatever the pages, ``prefault`` backs a piece of such a tensor with memory in one
madvise(MADV_POPULATE_WRITE) call just before a cast writes it, instead of one page fault
per page taken in the middle of the copy. On the reference VM a 1B fp32 -> bf16 cast with
it took 0.64-0.79 s (median of 6) against 0.85 s without, bf16 -> fp32 1.56-1.68 s against
1.81 s.
"""

from __future__ import annotations

import functools
import math
import mmap

from fasthug_patch import settings
from fasthug_patch.engine.mapped import madvise_inside

HUGE_PAGE = 2 << 20
# Below this a tensor is mostly edge pages; torch's allocator (which may reuse memory) is
# as good.
MIN_BYTES = 4 << 20
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
_populate_write_works = True


@functools.lru_cache(maxsize=1)
def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "" if
    it cannot be read (not Linux, or no THP support)."""
    try:
        with open(THP_MODE_FILE) as handle:
            text = handle.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def huge_pages_usable() -> bool:
    return settings.huge_pages() and thp_mode() in ("always", "madvise")


def empty(shape, dtype):
    """An uninitialised CPU tensor of ``shape`` and ``dtype``, on huge pages when that helps."""
    import torch

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not huge_pages_usable():
        return torch.empty(shape, dtype=dtype)
    try:
        return _huge_bytes(nbytes).view(dtype).view(shape)
    except (OSError, ValueError, RuntimeError):  # no address space or an odd platform
        return torch.empty(shape, dtype=dtype)


def _huge_bytes(nbytes: int):
    """``nbytes`` of anonymous memory as a uint8 tensor starting on a 2 MiB boundary (a
    huge page needs an aligned 2 MiB of virtual space; the unused pad is never touched, so
    it costs address space only)."""
    import torch

    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(MADV_HUGEPAGE)
    probe = torch.frombuffer(mapping, dtype=torch.uint8, count=1)
    pad = -probe.data_ptr() % HUGE_PAGE
    del probe
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=pad)


def prefault(piece) -> None:
    """Back the whole pages of ``piece`` (a contiguous CPU tensor about to be written) with
    memory now. Edge pages it shares with neighbours are left to the copy. A no-op where
    the kernel lacks MADV_POPULATE_WRITE, or once it has refused."""
    global _populate_write_works
    if not _populate_write_works:
        return
    if madvise_inside(piece.data_ptr(), piece.numel() * piece.element_size(), MADV_POPULATE_WRITE):
        _populate_write_works = False  # EINVAL on an older kernel: the copy faults the pages in
