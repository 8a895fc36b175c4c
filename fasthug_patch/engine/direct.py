"""Read checkpoint bytes with ``O_DIRECT``, past the page cache (FASTHUG_IO=direct).

A buffered read of a cold file costs this machine kind most of a core: the 2-core reference
VM spent 3.2-4.4 s of system time reading the 4.4 GB fp32 1b file with 16 threads of
``preadv`` and about 1 s populating it through a mapping, against 0.33-0.45 s with
``O_DIRECT``, at the same disk throughput. A cold cast load is CPU-bound there (the casts
share the two cores with the page cache's work), so reading past the page cache leaves the
cores to the casts. The price: the file is not in the page cache afterwards, so the next
load of it is cold too. That is why this is a setting and not the default.

Each read covers a whole number of 4 KiB blocks (``O_DIRECT`` wants aligned offsets,
lengths and buffers) into a per-thread buffer of anonymous memory (page-aligned), from
which the caller copies or casts the bytes it asked for.
"""

from __future__ import annotations

import mmap
import os
import threading

from fasthug_patch.errors import CheckpointError

# Offsets, lengths and buffer addresses are multiples of this: at least the logical block
# size of any disk in use (512 or 4096 bytes).
ALIGN = 4096


def _down(value: int) -> int:
    return value - value % ALIGN


def _up(value: int) -> int:
    return _down(value + ALIGN - 1)


def supported(path: str) -> str | None:
    """None if ``path`` can be opened with O_DIRECT; else why not (tmpfs and some network
    filesystems refuse it)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return "O_DIRECT is not available on this platform"
    try:
        fd = os.open(path, os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return f"O_DIRECT refused ({exc.strerror or exc})"
    os.close(fd)
    return None


class DirectFile:
    """One checkpoint file opened with O_DIRECT, shared by the reader threads (``preadv``
    takes its offset, so they need no lock to read); closed with the load."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            return self._fd

    def read(self, buffer: memoryview, begin: int, length: int, label: str | None) -> int:
        """Read file bytes [begin, begin+length) into ``buffer`` (page-aligned, at least
        ``span(length)`` long); returns where ``begin`` landed in it. A file that ends
        before the bytes do, or a failed read, is a CheckpointError naming the file and
        ``label`` (the tensor)."""
        start, end = _down(begin), begin + length
        want = _up(end) - start
        got = 0
        try:
            fd = self._open()
            while start + got < end:
                n = os.preadv(fd, [buffer[got:want]], start + got)
                got += max(n, 0)
                # Only the end of the file makes a read stop short of a block (and the next
                # read would be unaligned): short of ``end``, the file is shorter than its header said.
                if n <= 0 or (got % ALIGN and start + got < end):
                    raise CheckpointError(self.path, label, f"file ended at byte {start + got}, expected bytes up "
                                                            f"to {end} (truncated while loading?)")
        except OSError as exc:
            raise CheckpointError(self.path, label, f"read failed at byte {start + got}: {exc.strerror or exc}") from None
        return begin - start

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def span(length: int) -> int:
    """Buffer bytes a read of ``length`` bytes at any offset may need."""
    return _up(length) + ALIGN


class ThreadBuffers:
    """One page-aligned buffer per thread that asks, allocated on first use and dropped
    with the thread (the reader pool ends with the load): at most threads x ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()

    def get(self):
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = mmap.mmap(-1, self.size)
        return buffer
