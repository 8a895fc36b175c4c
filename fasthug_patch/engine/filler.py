"""Fill the page cache of a cold file with parallel ``os.preadv`` calls.

Reading a cold file through its mapping faults it in one readahead window at a time per
thread. Explicit reads of large chunks from many threads keep the disk's queue full, can
start before the model's layout is known (they need only the file), and report a short
read as an error naming the file. The reads land in one small discard buffer, so the fill
adds the page cache's bytes and almost nothing to the process: the tensors are then taken
from the mapping, zero-copy or cast chunk by chunk.
"""

from __future__ import annotations

import os
import threading

from fasthug_patch.errors import CheckpointError

# Each read is at most this long: 16 threads x 4 MiB keeps 64 MiB in flight, enough to
# saturate the reference disk.
READ_BYTES = 4 << 20

# The bytes read are never looked at (the tensors come from the mapping), so every thread
# reads into this one buffer: one 4 MiB allocation per process, faulted in once, instead of
# a fresh buffer per thread per load (which cost small cold loads 16k page faults).
_sink: memoryview | None = None
_sink_lock = threading.Lock()


def _buffer() -> memoryview:
    global _sink
    if _sink is None:
        with _sink_lock:
            if _sink is None:
                _sink = memoryview(bytearray(READ_BYTES))
    return _sink


def spans(total: int, step: int) -> list[tuple[int, int]]:
    """(start, length) pieces of at most ``step`` covering [0, total)."""
    return [(start, min(step, total - start)) for start in range(0, total, step)]


class FileFill:
    """The chunks of one file, each read once by some pool thread; waiters block on the
    chunks that cover the bytes they need."""

    def __init__(self, path: str, size: int, chunk_bytes: int) -> None:
        self.path = path
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.spans = spans(size, chunk_bytes)
        self._done = [threading.Event() for _ in self.spans]
        self._errors: dict[int, BaseException] = {}
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._pending = len(self.spans)
        self.skipped: set[int] = set()
        self.stopped = False
        self.shared = False  # other ranks read some chunks (ranks.py); then it never stops

    def stop(self) -> None:
        """Read no further chunks (those already read or in flight complete). A cast load
        reads faster through the mapping, page faults overlapping the casts, than after a
        fill that copies every byte once more. A fill shared with other ranks never stops:
        they wait for its chunks."""
        if not self.shared:
            self.stopped = True

    def read_chunk(self, index: int) -> None:
        """Read chunk ``index`` (called once per chunk, by a pool thread)."""
        start, length = self.spans[index]
        if self.stopped:
            self.skipped.add(index)
            self._done[index].set()
            self._chunk_finished()
            return
        try:
            fd = self._open()
            view = _buffer()
            got = 0
            while got < length:
                n = os.preadv(fd, [view[: min(READ_BYTES, length - got)]], start + got)
                if n == 0:
                    raise CheckpointError(self.path, None, f"file ended at byte {start + got}, expected {self.size} "
                                                           "bytes (truncated while loading?)")
                got += n
        except OSError as exc:
            self._errors[index] = CheckpointError(self.path, None, f"read failed at byte {start}: {exc.strerror or exc}")
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the chunk
            self._errors[index] = exc
        finally:
            self._done[index].set()
            self._chunk_finished()

    def mark_read(self, index: int) -> None:
        """Chunk ``index`` was read into the page cache (by another rank on this host, or by
        this process: then this is a no-op)."""
        with self._fd_lock:
            if self._done[index].is_set():
                return
            self._done[index].set()
        self._chunk_finished()

    def outcome(self, index: int) -> BaseException | None:
        """Wait for chunk ``index``; its error, if it failed."""
        self._done[index].wait()
        return self._errors.get(index)

    def cancel(self, index: int, error: BaseException) -> None:
        """Mark a chunk that will never be read (the load is being abandoned); a no-op for a
        chunk already done."""
        with self._fd_lock:
            if self._done[index].is_set():
                return
            self._errors.setdefault(index, error)
            self._done[index].set()
        self._chunk_finished()

    def wait(self, start: int, length: int) -> bool:
        """Block until the chunks holding bytes [start, start+length) are done; raise the
        error of a chunk that failed. True if they were all read (the bytes are in the page
        cache), False if the fill stopped before some of them."""
        if length <= 0:
            return True
        first, last = start // self.chunk_bytes, (start + length - 1) // self.chunk_bytes
        filled = True
        for index in range(first, min(last, len(self.spans) - 1) + 1):
            self._done[index].wait()
            error = self._errors.get(index)
            if error is not None:
                raise error
            filled = filled and index not in self.skipped
        return filled

    def _open(self) -> int:
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._fd

    def _chunk_finished(self) -> None:
        with self._fd_lock:
            self._pending -= 1
            if self._pending == 0 and self._fd is not None:
                os.close(self._fd)  # no descriptor outlives the fill
                self._fd = None
