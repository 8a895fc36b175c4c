"""Zero-copy tensors over a private memory map of a checkpoint file.

The map is MAP_PRIVATE and writable: a tensor handed to the model reads straight from the
page cache, and a later in-place update (training) copies the page on write instead of
touching the file. The mapping is torch's own (``UntypedStorage.from_file``, as safetensors
uses), which keeps no file descriptor open; each tensor gets its own storage slice over its
byte range, as safetensors' loader gives, so storage-based tie and share detection sees the
same structure as stock.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading

from fasthug_patch.errors import CheckpointError
from fasthug_patch.plan import TensorRef

PAGE = mmap.PAGESIZE
# Linux 5.14+: fault pages in from the kernel side; errors come back as EFAULT/EIO
# instead of a SIGBUS in whichever thread touches the page first.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _NotSupported(Exception):
    pass


def madvise_inside(address: int, length: int, advice: int) -> int:
    """madvise(``advice``) over the pages wholly inside [address, address+length): edge
    pages shared with neighbouring memory are left alone. 0, or the call's errno."""
    first = address + (-address) % PAGE
    end = (address + length) - (address + length) % PAGE
    if end <= first or _libc.madvise(first, end - first, advice) == 0:
        return 0
    return ctypes.get_errno()


def _populate(address: int, length: int) -> None:
    """MADV_POPULATE_READ over [address, address+length), widened to whole pages."""
    aligned = address - address % PAGE
    if _libc.madvise(aligned, address + length - aligned, MADV_POPULATE_READ) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):  # kernel before 5.14, or memory it cannot populate
        raise _NotSupported
    raise OSError(err, os.strerror(err))


def populate_address(address: int, length: int, label: str) -> None:
    """Fault in any CPU memory (a weight mapped from a file, or anonymous) from the kernel
    side, so a file that shrank under its mapping is an error naming ``label`` rather than a
    SIGBUS in the thread that touches the page."""
    if length <= 0:
        return
    try:
        _populate(address, length)
    except _NotSupported:
        pass
    except OSError as exc:
        raise CheckpointError("(memory-mapped weight)", label,
                              f"its pages could not be read ({exc.strerror}); was its file truncated?") from None


def _check_mapped(path: str, mapped_size: int, ref: TensorRef) -> None:
    """Raise CheckpointError if ``ref``'s bytes lie past the mapping (no system call)."""
    if ref.offset + ref.nbytes > mapped_size:
        raise CheckpointError(path, ref.name, "tensor lies past the end of the file (truncated?)")


def _file_size(path: str) -> int:
    """The file's size now; -1 if it is gone."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _check_inside(path: str, mapped_size: int, ref: TensorRef) -> None:
    """Raise CheckpointError if ``ref``'s bytes lie past the mapped size or the file's size now."""
    _check_mapped(path, min(mapped_size, _file_size(path)), ref)


class MappedFile:
    """One checkpoint file, mapped once for the whole load."""

    def __init__(self, path: str) -> None:
        import torch

        self.path = path
        try:
            self.size = os.stat(path).st_size
            self.storage = (
                torch.UntypedStorage.from_file(path, shared=False, nbytes=self.size) if self.size else None
            )
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(path, None, f"cannot map: {exc}") from exc
        self.base = self.storage.data_ptr() if self.storage is not None else 0
        self._populate_supported = True

    def raw_bytes(self, ref: TensorRef):
        """The bytes of ``ref`` as a uint8 tensor over the mapping (own storage slice).
        Checked against the mapping only: a view reads nothing now. A file shrunk after it
        was mapped fails the adapters' check_unchanged once the weights are placed (a
        fallback to stock), and whoever reads the bytes here checks the file's size first
        (check_size, or MADV_POPULATE_READ); a stat per tensor was 5-15% of a warm
        pre-quantised load."""
        import torch

        _check_mapped(self.path, self.size, ref)
        piece = self.storage[ref.offset : ref.offset + ref.nbytes]
        return torch.empty(0, dtype=torch.uint8).set_(piece, 0, (ref.nbytes,), (1,))

    def tensor(self, ref: TensorRef):
        """A tensor sharing the mapped bytes of ``ref`` (no copy)."""
        import torch

        dtype = ref.torch_dtype()
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=dtype)
        return self.raw_bytes(ref).view(dtype).view(ref.shape)

    def populate(self, ref: TensorRef, start: int, length: int) -> None:
        """Make bytes [start, start+length) of ``ref`` resident, reporting a vanished or
        unreadable range as an error that names the file instead of a SIGBUS later."""
        self.populate_bytes(ref.offset + start, length, ref.name)

    def populate_bytes(self, begin: int, length: int, label: str | None = None) -> None:
        """Make bytes [begin, begin+length) of the file resident in this mapping; an error
        naming the file (and ``label``, the tensor) if they cannot be read."""
        if length <= 0 or not self._populate_supported:
            return
        try:
            _populate(self.base + begin, length)
        except _NotSupported:
            self._populate_supported = False
        except OSError as exc:
            raise CheckpointError(
                self.path, label,
                f"bytes {begin}..{begin + length} could not be read ({exc.strerror}); was the file changed?",
            ) from None

    def release(self, ref: TensorRef, start: int, length: int) -> None:
        """Unmap the pages that lie wholly inside bytes [start, start+length) of ``ref``
        (already cast into their final tensor), so a cast load's resident memory stays
        the final model's, not the final model's plus the checkpoint's. The page cache
        keeps them; nothing was written to them, so a later read would see the same bytes."""
        self.release_address(self.base + ref.offset + start, length)

    def holds(self, address: int, length: int) -> bool:
        return self.storage is not None and self.base <= address and address + length <= self.base + self.size

    def release_address(self, address: int, length: int) -> None:
        """Unmap the pages wholly inside [address, address+length) of this mapping."""
        if self.holds(address, length):
            madvise_inside(address, length, MADV_DONTNEED)

    def check_size(self, ref: TensorRef) -> None:
        """Raise CheckpointError if ``ref``'s bytes are no longer all inside the file."""
        _check_inside(self.path, self.size, ref)


class SharedReadMapping:
    """A read-only MAP_SHARED mapping of a whole file, for pinning its page-cache pages in
    place (cudaHostRegister). Not the private mapping the CPU path hands out: pinning pages
    of a private mapping makes the kernel unshare (copy) every one of them first; measured on
    an H100 machine, a 2 GB file's registration had not finished after 40 s, against 0.13 s
    for 4 GB through a shared read-only mapping."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        except (OSError, ValueError) as exc:
            raise CheckpointError(path, None, f"cannot map: {exc}") from exc
        self._bytes = None
        if self._map is not None:
            import warnings

            import torch

            with warnings.catch_warnings():  # "non-writable buffer": it is only ever read
                warnings.simplefilter("ignore")
                self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.base = self._bytes.data_ptr() if self._bytes is not None else 0

    def raw_bytes(self, ref: TensorRef):
        _check_inside(self.path, self.size, ref)
        return self._bytes[ref.offset : ref.offset + ref.nbytes]

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor view still exists somewhere: the GC unmaps it later
                pass


class MappedFiles:
    """Path -> MappedFile, opened on first use, shared by the reader threads."""

    def __init__(self) -> None:
        self._files: dict[str, MappedFile] = {}
        self._lock = threading.Lock()

    def release_view(self, tensor) -> bool:
        """Unmap the pages wholly inside ``tensor``'s bytes if it is a view of one of these
        mappings (a source whose only use is over: quantised into other memory). Nothing
        was written to them, so a later read of the view would fault the same bytes back
        in from the page cache. False if the tensor is not such a view."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return False
        address, length = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        owner = self._owner(address, length)
        if owner is None:
            return False
        owner.release_address(address, length)
        return True

    def _owner(self, address: int, length: int) -> MappedFile | None:
        """The mapping that holds [address, address+length), if any."""
        with self._lock:
            return next((m for m in self._files.values() if m.holds(address, length)), None)

    def check_views(self, tensors, label: str, names: dict | None = None) -> None:
        """Raise CheckpointError if any of ``tensors`` that is a view of these mappings now
        lies past the end of its file; the error names the file and the tensor (``names``:
        (file, offset) -> tensor name; else ``label``). Called just before code that is not
        ours reads such views (a weight conversion, a quantizer): a view is handed out
        unchecked (it reads nothing), and a page past the end of a shrunk file is a SIGBUS
        that would kill the process, where this is an error the load falls back from."""
        sizes: dict[str, int] = {}  # one stat per file, however many views (experts) it holds
        for tensor in tensors:
            if getattr(tensor, "device", None) is None or tensor.device.type != "cpu" or not tensor.numel():
                continue
            address, length = tensor.data_ptr(), tensor.numel() * tensor.element_size()
            owner = self._owner(address, length)
            if owner is None:
                continue
            if owner.path not in sizes:
                sizes[owner.path] = min(owner.size, _file_size(owner.path))
            offset = address - owner.base
            name = (names or {}).get((owner.path, offset), label)
            _check_mapped(owner.path, sizes[owner.path], TensorRef(owner.path, name, "U8", (length,), offset, length))

    def get(self, path: str) -> MappedFile:
        with self._lock:
            mapped = self._files.get(path)
            if mapped is None:
                mapped = self._files[path] = MappedFile(path)
            return mapped
