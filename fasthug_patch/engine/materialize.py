"""Turn checkpoint tensors into final tensors, in parallel threads.

Files first: ``prepare(files)`` (called as soon as the files are known, before the model
is built) probes each file's page-cache residency and picks how to read it (recorded in
``io``): a cached file is used through its mapping as is; a cold one is first filled into
the page cache by parallel ``preadv`` chunks in file order (engine/filler.py), which start
at once and overlap model construction.

Then tensors: a request is (source, dtype, device) and returns a Future of the final tensor:
- same dtype on CPU: a zero-copy view of the mapped file, once its bytes are in the page
  cache (cached, or filled); prefaulted in chunks only where that is how the file is read,
  and for a cached file mapped ahead while the model is built (``map_ahead``);
- another dtype: a fresh tensor of the target dtype, filled chunk by chunk straight from
  the mapped bytes, so the cast is done once and no intermediate copy exists; the source
  pages are unmapped chunk by chunk after their cast, so the process never holds the
  checkpoint and the cast model at once.
Every request is split into chunks of at most ``chunk_bytes``. Two pools run them, each in
submission order: the readers (fills, waits for filled bytes, prefaults) and the casters
(one per core). A chunk of a cold file first waits, on a reader, for the fill of its bytes,
which was queued earlier, so a waiting thread never waits on work queued behind it; then
its cast goes to the casters, which never wait on anything.

If the files to load are larger than the memory available, nothing is prefaulted or
prefetched: pages are read on first use, as stock does, rather than thrash.

torch's copy kernels and preadv release the GIL, so plain threads scale.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor

from fasthug_patch import settings, thread_modes
from fasthug_patch.engine import devices, direct, host_memory, residency
from fasthug_patch.engine.filler import FileFill, spans as _spans
from fasthug_patch.engine.mapped import MappedFiles
from fasthug_patch.engine.ring import shared_ring
from fasthug_patch.engine.to_device import DeviceStreamer, itemsize, to_device_as_stock
from fasthug_patch.errors import CheckpointError, FastPathError, Unsupported
from fasthug_patch.plan import TensorRef

# A file at least this much in the page cache is read through its mapping directly.
CACHED_ENOUGH = 0.9
# A cold file smaller than this is left to the kernel's readahead on first use: for a
# 0.27 GB file (125m bf16) on 4.57, 16 threads of preadv took 0.29-0.35 s to ready against
# 0.24-0.28 s for plain sequential faults; from 2.2 GB up the parallel fill wins (1.3 s
# against 1.8 s).
FILL_MIN_BYTES = 512 << 20
# map_ahead faults pages in with one MADV_POPULATE_READ per piece, pieces shared by the
# casters; views this close together are mapped as one range. On the 2-core VM 64 MiB
# pieces on two threads mapped a 1.2 GB file held in small page-cache folios in 0.055 s,
# against 0.10 s for one call over the whole file (large folios: 0.003-0.007 s either way).
MAP_AHEAD_PIECE = 64 << 20
MAP_AHEAD_GAP = 1 << 16
# close() waits this long at most for a share's follower thread: one poll of the store.
FOLLOWER_JOIN_SECONDS = 10.0


class _Assembly:
    """Completes ``future`` with ``value`` once all its chunks have run, or, given
    ``finish``, calls that instead (device work still has to finish first)."""

    __slots__ = ("future", "value", "remaining", "lock", "label", "finish")

    def __init__(self, future: Future, value, chunks: int, label: str, finish=None) -> None:
        self.future, self.value, self.remaining, self.label = future, value, chunks, label
        self.finish = finish
        self.lock = threading.Lock()

    def chunk_done(self, error: BaseException | None) -> None:
        with self.lock:
            if self.future.done():
                return
            try:
                if error is not None:
                    self.future.set_exception(error)
                    return
                self.remaining -= 1
                if self.remaining == 0:
                    if self.finish is not None:
                        self.finish()
                    else:
                        self.future.set_result(self.value)
            except InvalidStateError:  # cancelled meanwhile (Materializer.drop_ahead): nobody waits
                pass


class Materializer:
    """One per load; ``close()`` waits for or cancels what is still queued."""

    def __init__(self, threads: int, chunk_bytes: int, populate: bool | None, io_mode: str = "auto") -> None:
        self.threads = threads
        self.chunk_bytes = chunk_bytes
        self.populate = populate
        self.io_mode = io_mode
        self.files = MappedFiles()
        self.io: dict[str, str] = {}  # file -> how it was read, and why
        self.notes: list[str] = []
        self._fills: dict[str, FileFill] = {}
        self._lazy: set[str] = set()
        self._direct: dict[str, direct.DirectFile] = {}  # cold files read past the page cache (FASTHUG_IO=direct)
        self._buffers = direct.ThreadBuffers(direct.span(chunk_bytes))
        self._populate: set[str] = set()  # files whose zero-copy tensors are prefaulted
        self._cold: set[str] = set()  # files not (mostly) in the page cache when prepared
        self._viewed: dict[tuple[str, int], str] = {}  # (file, offset) handed out zero-copy -> its name
        # (file, tensor name) -> (dtype, Future, source bytes): casts started before anyone asked.
        # Keyed by name, not offset: an empty tensor's offset is its neighbour's.
        self._ahead: dict[tuple[str, str], tuple[object, Future, int]] = {}
        self.ahead_started = 0
        self.ahead_claimed = 0
        self.bytes_mapped_ahead = 0
        self._prepare_lock = threading.Lock()
        # Two pools: readers (fills, waits on fills, prefaults: many, as a network disk needs
        # the queue depth) and casters (CPU work: as many as cores, so a warm cast load runs
        # on a few busy threads instead of sixteen taking turns; measured on the 2-core VM,
        # 125m bf16 -> fp32 on 4.57: 0.18-0.20 s with 2 threads against 0.22-0.26 s with 16).
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fasthug-reader")
        self._cast_pool = ThreadPoolExecutor(max_workers=min(threads, settings.cast_threads()),
                                             thread_name_prefix="fasthug-cast")
        self._failed: BaseException | None = None
        self._stats_lock = threading.Lock()
        self.bytes_read = 0
        self.tensors_mapped = 0
        self.tensors_cast = 0
        self.tensors_copied = 0  # read into fresh memory in their own dtype (O_DIRECT files)
        self.busy_seconds = 0.0
        self._streamers: dict[str, DeviceStreamer] = {}
        self.bytes_filled = 0  # read from checkpoint files by this process's preadv fills
        self._shares: list = []  # (ranks.Share, its chunks, the PeerGroup) per load shared with other ranks
        self._followers: list[threading.Thread] = []  # one per share: marks its chunks read
        self._sharing = ""  # why the reading was not shared (report.ranks)
        self.backend_for = devices.backend_for  # device -> backend (tests swap in a stand-in)

    # -- files ----------------------------------------------------------------
    @thread_modes.engine_entry
    def prepare(self, files, peers=None) -> None:
        """Choose how to read each of ``files`` and start filling the cold ones. With
        ``peers`` (a ranks.PeerGroup), fill them together with the other ranks of this host
        that load the same files, each chunk read by one of them."""
        with self._prepare_lock:
            todo = [str(f) for f in files if str(f) not in self.io and os.path.isfile(f)]
            if not todo:
                return
            sizes = {f: os.path.getsize(f) for f in todo}
            available = residency.available_memory_bytes()
            if available is not None and sum(sizes.values()) > available:
                self._go_lazy(todo, sum(sizes.values()), available)
                return
            shared = peers is not None and self._worth_sharing(sizes)
            for name in todo:
                self._choose(name, sizes[name], shared)
            if shared:
                self._share_fills(peers, [name for name in todo if name in self._fills])

    def _worth_sharing(self, sizes: dict[str, int]) -> bool:
        if self.io_mode != "read" and sum(sizes.values()) < FILL_MIN_BYTES:
            self.sharing = "not shared: checkpoint too small to be worth it"
            return False
        return True

    def _share_fills(self, peers, names: list[str]) -> None:
        """Fill ``names`` with the other ranks: queue one claiming job per chunk (each reads
        whichever chunk it claims, or nothing once all are claimed), and a thread that marks
        each chunk read, in file order, once its reader reports it."""
        from fasthug_patch import ranks

        chunks = [(self._fills[name], index) for name in names for index in range(len(self._fills[name].spans))]
        share = peers.share(ranks.fingerprint([(name, self._fills[name].size) for name in names]),
                            [fill.spans[index][1] for fill, index in chunks])
        self._shares.append((share, chunks, peers))
        for _ in chunks:
            self._pool.submit(self._claim_job, share, chunks)
        follower = threading.Thread(target=self._follow_share, args=(share, chunks), name="fasthug-ranks", daemon=True)
        follower.start()
        self._followers.append(follower)

    def _claim_job(self, share, chunks) -> None:
        if self._failed is not None:
            return  # nothing claimed: the other ranks read what is left
        try:
            number = share.claim()
            if number is None:
                return
            fill, index = chunks[number]
            self._read_chunk(fill, index)  # even if this load fails meanwhile: the other ranks wait for it
            share.post(number, fill.outcome(index))
        except Exception as exc:  # noqa: BLE001 - the job's store failed: this rank cannot take part
            _cancel_all(chunks, 0, _store_failed(share, exc))

    def _follow_share(self, share, chunks) -> None:
        """Mark each chunk read as soon as its reader (this rank or another) reports it, in
        file order; on a peer's failure or timeout, fail every waiter of the chunks left."""
        from fasthug_patch.errors import DistributedLoadError

        for number, (fill, index) in enumerate(chunks):
            start, length = fill.spans[index]
            try:
                if not share.wait(number, f"bytes {start}..{start + length} of {fill.path}"):
                    return  # the load ended
            except DistributedLoadError as exc:
                _cancel_all(chunks, number, exc)
                return
            except Exception as exc:  # noqa: BLE001
                _cancel_all(chunks, number, _store_failed(share, exc))
                return
            fill.mark_read(index)

    @property
    def sharing(self) -> str:
        """How the reading was shared with other ranks, or why it was not (report.ranks)."""
        if not self._shares:
            return self._sharing
        parts = []
        for share, chunks, peers in self._shares:
            parts.append(f"shared: rank {peers.rank} read {share.claimed} of {len(chunks)} chunks "
                         f"as {share.slot + 1} of {share.slots} ranks on {peers.host}")
        return "; ".join(parts)

    @sharing.setter
    def sharing(self, value: str) -> None:
        self._sharing = value

    def _choose(self, name: str, size: int, shared: bool = False) -> None:
        by_residency = self.io_mode in ("auto", "direct")
        cached = residency.resident_fraction(name) if by_residency else None
        cold = cached is None or cached < CACHED_ENOUGH  # unknown (forced mode) counts as cold
        if cold:
            self._cold.add(name)
        why = f"{cached:.0%} cached" if cached is not None else f"FASTHUG_IO={self.io_mode}"
        if self.io_mode == "direct" and cold and size and not shared and self._choose_direct(name, why):
            return
        small = by_residency and cold and size < FILL_MIN_BYTES and not shared
        read = self.io_mode == "read" or (by_residency and cold and not small)
        if not read or size == 0:
            self.io[name] = f"mmap ({why}{', small: read on first use' if small else ''})"
            # Unless told, prefault only a cold file that is not filled: there, parallel
            # prefaulting is what reads it.
            if self.populate or (self.populate is None and cached is None):
                self._populate.add(name)
                self.io[name] += ", prefaulted"
            return
        if self.populate:
            self._populate.add(name)
        fill = self._fills[name] = FileFill(name, size, self.chunk_bytes)
        if shared:
            fill.shared = True
            self.io[name] = f"read: {len(fill.spans)} preadv chunks shared with the other ranks, {self.threads} threads ({why})"
            return  # _share_fills queues the reads
        self.io[name] = f"read: {len(fill.spans)} preadv chunks, {self.threads} threads ({why})"
        for index in range(len(fill.spans)):
            self._pool.submit(self._fill_job, fill, index)

    def _choose_direct(self, name: str, why: str) -> bool:
        """Read cold file ``name`` with O_DIRECT where the filesystem allows it (a file
        shared with other ranks is filled instead: they meet in the page cache)."""
        refused = direct.supported(name)
        if refused is not None:
            self.notes.append(f"{os.path.basename(name)}: {refused}; read through the page cache instead")
            return False
        self._direct[name] = direct.DirectFile(name)
        self.io[name] = (f"direct: O_DIRECT reads, {self.threads} threads, {self.chunk_bytes >> 20 or 1} MiB each, "
                         f"cast or copied into fresh tensors ({why})")
        return True

    def _fill_job(self, fill: FileFill, index: int) -> None:
        if self._failed is not None:
            fill.cancel(index, self._failed)
            return
        self._read_chunk(fill, index)

    def _read_chunk(self, fill: FileFill, index: int) -> None:
        began = time.perf_counter()
        fill.read_chunk(index)
        with self._stats_lock:
            self.busy_seconds += time.perf_counter() - began
            if fill.outcome(index) is None and index not in fill.skipped:
                self.bytes_filled += fill.spans[index][1]

    def _go_lazy(self, names: list[str], total: int, available: int) -> None:
        note = (
            f"checkpoint files ({total / 1e9:.2f} GB) exceed the memory available ({available / 1e9:.2f} GB): "
            "weights are mapped and read on first use, as stock does, instead of prefetched"
        )
        self.notes.append(note)
        warnings.warn(f"fasthug_patch: {note}", UserWarning, stacklevel=2)
        for name in names:
            self._lazy.add(name)
            self.io[name] = "mmap, read on first use (low memory)"

    def _fill_of(self, path: str) -> FileFill | None:
        if path not in self.io:
            self.prepare([path])
        return self._fills.get(path)

    # -- requests -------------------------------------------------------------
    @thread_modes.engine_entry
    def cast_ahead(self, refs, dtype) -> int:
        """Start casting ``refs`` to ``dtype`` before the loader asks for them, while stock
        still builds the model on the meta device and a core is free. It is a guess: a
        result is handed over only to a request for the same tensor as the same dtype (a
        cast is deterministic, so it is the tensor that request would have made); any other
        request for that tensor first waits for the guess to end, then is served as usual.
        Aligned tensors of page-cached files only. Returns how many casts were started."""
        started = 0
        for ref in refs:
            key = (ref.file, ref.name)
            # An empty tensor: nothing to gain by guessing it.
            if (not ref.nbytes or not needs_cast(ref, dtype) or key in self._ahead
                    or (ref.file, ref.offset) in self._viewed):
                continue
            self._fill_of(ref.file)
            read_direct = self._direct.get(ref.file)
            if not ref.aligned:
                continue
            if read_direct is not None:
                future = self._read_direct(read_direct, ref, dtype)
            elif ref.file in self._cold or ref.file in self._lazy or ref.file in self._fills:
                continue
            else:
                mapped = self.files.get(ref.file)
                future = self._cast(mapped.tensor(ref), ref, dtype, mapped, None)
            self._ahead[key] = (dtype, future, ref.nbytes)
            started += 1
        self.ahead_started += started
        return started

    @thread_modes.engine_entry
    def map_ahead(self, refs) -> int:
        """Fault the pages of ``refs`` (tensors the loader will most likely take as zero-copy
        views) into this process's mappings on the casters, after any casts started ahead,
        while stock still builds the model and a core is free; otherwise whichever thread
        first reads a weight (the user's first forward) takes those faults, one at a time.
        Page-cached files only: doing the same for a filled file, each piece as its bytes
        arrived, made a cold 1B bf16 load slower (5.23: 1.55-1.82 s to ready against
        1.34-1.46 s). Not with FASTHUG_POPULATE=0. Nothing waits for it: a view is handed
        out as before, and a piece that fails (a file that shrank) is left to the checks
        the load makes anyway. Returns the bytes queued."""
        if self.populate is False:
            return 0
        queued = 0
        for path, begin, end in _extents(refs):
            self._fill_of(path)
            if path in self._cold or path in self._lazy or path in self._populate:
                continue
            mapped = self.files.get(path)
            for start in range(begin, end, MAP_AHEAD_PIECE):
                length = min(MAP_AHEAD_PIECE, end - start)
                self._cast_pool.submit(self._map_piece, mapped, start, length)
                queued += length
        self.bytes_mapped_ahead += queued
        return queued

    def _map_piece(self, mapped, start: int, length: int) -> None:
        if self._failed is not None:
            return
        began = time.perf_counter()
        try:
            mapped.populate_bytes(start, length)
        except CheckpointError:
            pass  # the file changed: the load's own checks meet it and report it
        finally:
            with self._stats_lock:
                self.busy_seconds += time.perf_counter() - began

    def _claimed_ahead(self, ref: TensorRef, dtype) -> Future | None:
        """The cast of ``ref`` started ahead, if it was to ``dtype``. A guess for another
        dtype is waited for (its span releases unmap source pages, which must not happen
        under a view handed out from now on) and its result dropped."""
        entry = self._ahead.pop((ref.file, ref.name), None)
        if entry is None:
            return None
        guessed, future, nbytes = entry
        if needs_cast(ref, dtype) and guessed == dtype:
            self.ahead_claimed += 1
            return future
        _wait_quietly(future)
        self._uncount_ahead(nbytes)
        return None

    def drop_ahead(self) -> None:
        """Cancel the casts started ahead that nobody asked for (their spans not yet run are
        skipped), so that their memory goes now: stock's loader may be about to load the
        same weights itself."""
        unclaimed, self._ahead = self._ahead, {}
        for _, future, nbytes in unclaimed.values():
            future.cancel()
            self._uncount_ahead(nbytes)

    def _uncount_ahead(self, nbytes: int) -> None:
        """A cast started ahead (of ``nbytes`` source bytes) was not used: it is not part of
        the load's statistics."""
        with self._stats_lock:
            self.tensors_cast -= 1
            self.bytes_read -= nbytes

    @thread_modes.engine_entry
    def submit(self, source, dtype=None, device="cpu", stock_casts_on_device=False) -> Future:
        """Schedule ``source`` (a TensorRef or a CPU torch.Tensor) as ``dtype`` on ``device``.
        ``stock_casts_on_device``: for a GPU ``device``, whether the stock loader casts there
        too (4.57 reading a shard on the GPU), rather than on the CPU before the copy: then
        a NaN's payload is the device's, and the cast is not redone on the CPU."""
        if self._ahead and isinstance(source, TensorRef):
            claimed = self._claimed_ahead(source, dtype if str(device) in ("cpu", "None") else None)
            if claimed is not None:
                return claimed
        if str(device) not in ("cpu", "None"):
            return self._submit_to_device(source, dtype, device, stock_casts_on_device)
        if isinstance(source, TensorRef):
            fill = self._fill_of(source.file)
            read_direct = self._direct.get(source.file)
            if read_direct is not None and source.aligned:
                return self._read_direct(read_direct, source, dtype)
            mapped = self.files.get(source.file)
            if not needs_cast(source, dtype) and source.aligned:
                return self._mapped_view(mapped, source, fill)
            if not source.aligned:
                if fill is None or not fill.wait(source.offset, source.nbytes):
                    mapped.populate(source, 0, source.nbytes)
                return self._cast(_read_unaligned(mapped, source), source, dtype, None, None)
            if fill is not None:
                fill.stop()
            return self._cast(mapped.tensor(source), source, dtype, mapped, fill)
        if not needs_cast(source, dtype):
            done: Future = Future()
            done.set_result(source[...])  # what stock hands over: a view of the same storage
            return done
        return self._cast(source, None, dtype, None, None)

    def _submit_to_device(self, source, dtype, device, stock_casts_on_device=False) -> Future:
        streamer = self._streamer(device)
        with self._stats_lock:
            self.bytes_read += source.nbytes if isinstance(source, TensorRef) else source.numel() * source.element_size()
        if isinstance(source, TensorRef):
            fill = self._fill_of(source.file)
            if fill is not None:
                fill.stop()  # the pieces read straight into pinned memory; a page-cache fill would be a second copy
            warm = source.file not in self._cold and source.file not in self._lazy
            if warm and settings.pin_cached_files() and (dtype is None or dtype == source.torch_dtype()):
                direct = streamer.submit_direct(source)
                if direct is not None:
                    return direct
            return streamer.submit_ref(source, dtype, fill, stock_casts_on_device)
        if (dtype is None or dtype == source.dtype) and source.device.type == "cpu" and source.is_contiguous():
            return streamer.submit_tensor(source)
        done: Future = Future()
        done.set_result(to_device_as_stock(source[...], streamer.backend.device, dtype, stock_casts_on_device))
        return done

    def _streamer(self, device) -> DeviceStreamer:
        key = str(device)
        with self._prepare_lock:
            streamer = self._streamers.get(key)
            if streamer is None:
                try:
                    backend = self.backend_for(device)
                except Exception as exc:  # noqa: BLE001
                    raise Unsupported(f"device {device}: {exc}") from exc
                # One streamer per device, however it is spelt (0, "cuda:0", a torch.device):
                # two would pin the same file pages twice, and the second pinning is refused.
                streamer = next((s for s in self._streamers.values() if s.backend is backend), None)
                if streamer is None:
                    streamer = DeviceStreamer(backend, lambda: shared_ring(backend), self._run, _Assembly)
                self._streamers[key] = streamer
            return streamer

    @thread_modes.engine_entry
    def pin_ahead(self, device) -> int:
        """Start pinning the page-cached files bound for ``device`` (a CUDA device) in place
        while stock builds the model, so their DMAs start as soon as the loader asks
        (FASTHUG_PIN_FILES). Returns how many files were started."""
        if not settings.pin_cached_files():
            return 0
        streamer = self._streamer(device)
        warm = [f for f in self.io if f not in self._cold and f not in self._lazy]
        for path in warm:
            streamer.pin_file(path)
        return len(warm)

    @property
    def tensors_to_device(self) -> int:
        return sum(s.tensors for s in self._unique_streamers())

    def _unique_streamers(self) -> list[DeviceStreamer]:
        return list({id(s): s for s in self._streamers.values()}.values())  # a device's aliases once

    def may_stage(self, casting: bool) -> bool:
        """Whether a GPU load of the prepared files may need the pinned staging ring: always,
        unless page-cached files are pinned in place (FASTHUG_PIN_FILES); then only for cold
        files or casts. The same split as _submit_to_device makes per tensor."""
        return casting or bool(self._cold) or not settings.pin_cached_files()

    def _mapped_view(self, mapped, ref: TensorRef, fill: FileFill | None) -> Future:
        future: Future = Future()
        view = mapped.tensor(ref)
        with self._stats_lock:
            self.tensors_mapped += 1
            self.bytes_read += ref.nbytes
            self._viewed[(ref.file, ref.offset)] = ref.name
        populate = ref.file in self._populate
        if ref.nbytes == 0 or (fill is None and not populate):
            future.set_result(view)
            return future
        # Ready once its bytes are in the page cache (its fill done) and, if asked, mapped.
        spans = _spans(ref.nbytes, self.chunk_bytes)
        assembly = _Assembly(future, view, len(spans), ref.name)
        for start, length in spans:
            self._run(assembly, _populate_span, mapped, fill, ref, start, length, populate)
        return future

    def check_views(self, tensors, label: str) -> None:
        """Just before code that is not ours reads ``tensors``: raise CheckpointError if a
        zero-copy view among them now lies past the end of its file (named by its tensor's
        name, else ``label``)."""
        self.files.check_views(tensors, label, self._viewed)

    def _cast(self, src, ref: TensorRef | None, dtype, mapped, fill: FileFill | None) -> Future:
        """Cast ``src`` into a fresh tensor chunk by chunk. With ``mapped``, ``src`` lies in
        that mapping: each chunk waits for its fill, and its source pages are unmapped after."""
        future: Future = Future()
        dtype = dtype or src.dtype
        label = ref.name if ref is not None else "tensor"
        dst = host_memory.empty(src.shape, dtype)
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
        if mapped is not None and ref.file not in self._lazy:
            # Released pages must not belong to a tensor also handed out zero-copy.
            release = (ref.file, ref.offset) not in self._viewed
            if release:
                # Each span unmaps its pages after its cast, but a neighbour span populated
                # later can map them again: a page-cache folio of up to 2 MiB is mapped whole
                # by one fault. So the tensor's pages are unmapped once more when it is done.
                assembly.finish = lambda: _release_and_set(mapped, ref, future, dst)
            # A file truncated under the mapping must be an exception naming it, not a SIGBUS
            # in copy_. A cold file's chunk is faulted in by MADV_POPULATE_READ first (an
            # EFAULT, and the read happens there anyway); a cached file's chunk only has its
            # file size checked: populating, copying and unmapping every page of a cached
            # file measured 2-4x slower than copying it (0.54-0.85 s against 0.18-0.2 s for a
            # 0.54 GB fp32 -> bf16 load), and a shrink in the microseconds between the check
            # and the copy is the same risk stock runs reading its own mapping.
            populate = ref.file in self._cold
            size = src_flat.element_size()
            for start, count in spans:
                cast = (_cast_mapped_span, dst_flat, src_flat, start, count, mapped, not populate, release, ref)
                if populate:  # a cold file (any fill is of one): a reader waits for or reads in its bytes
                    self._run(assembly, _populate_span, mapped, fill, ref, start * size, count * size, True,
                              then=cast)
                else:
                    self._run(assembly, *cast, pool=self._cast_pool)
        else:
            for start, count in spans:
                self._run(assembly, _copy_span, dst_flat, src_flat, start, count, pool=self._cast_pool)
        return future

    def _read_direct(self, read_direct: direct.DirectFile, ref: TensorRef, dtype) -> Future:
        """Read ``ref`` with O_DIRECT into a fresh tensor of ``dtype`` (its own by default):
        each chunk is read into the reader thread's buffer and cast (or copied) from there
        by the same thread, so no page-cache or full-precision copy of the file exists."""
        future: Future = Future()
        source_dtype = ref.torch_dtype()
        dst = host_memory.empty(ref.shape, dtype or source_dtype)
        with self._stats_lock:
            if dst.dtype == source_dtype:
                self.tensors_copied += 1
            else:
                self.tensors_cast += 1
            self.bytes_read += ref.nbytes
        if ref.numel == 0:
            future.set_result(dst)
            return future
        dst_flat = dst.view(-1)
        per_chunk = max(1, self.chunk_bytes // max(dst.element_size(), ref.itemsize))
        spans = _spans(ref.numel, per_chunk)
        assembly = _Assembly(future, dst, len(spans), ref.name)
        for start, count in spans:
            self._run(assembly, self._read_direct_span, read_direct, ref, dst_flat, start, count)
        return future

    def _read_direct_span(self, read_direct: direct.DirectFile, ref: TensorRef, dst_flat, start: int, count: int) -> None:
        import torch

        length = count * ref.itemsize
        buffer = self._buffers.get()
        at = read_direct.read(memoryview(buffer), ref.offset + start * ref.itemsize, length, ref.name)
        source = torch.frombuffer(buffer, dtype=torch.uint8, count=length, offset=at).view(ref.torch_dtype())
        piece = dst_flat[start : start + count]
        host_memory.prefault(piece)
        piece.copy_(source)
        with self._stats_lock:
            self.bytes_filled += length

    # -- execution ------------------------------------------------------------
    def _run(self, assembly: _Assembly, fn, *args, pool: ThreadPoolExecutor | None = None, then=None) -> None:
        """Run ``fn(*args)`` as one chunk of ``assembly`` on ``pool`` (the readers by
        default); with ``then`` (a function and its arguments), that runs next on the cast
        pool and counts as the chunk's end."""
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
            if then is None:
                assembly.chunk_done(None)
                return
            try:
                self._run(assembly, *then, pool=self._cast_pool)
            except RuntimeError as exc:  # the cast pool shut down: the load was abandoned
                assembly.chunk_done(exc)

        (pool or self._pool).submit(job)

    def close(self, cancel: bool = False) -> None:
        if cancel and self._failed is None:
            self._failed = FastPathError("load abandoned")
        self.drop_ahead()
        if self.ahead_started:
            self.notes.append(f"cast while the model was built: {self.ahead_started} tensors, "
                              f"{self.ahead_claimed} of them as the loader then asked")
        if self.bytes_mapped_ahead:
            self.notes.append(f"mapped ahead of the loader: {self.bytes_mapped_ahead / 1e9:.2f} GB")
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        self._cast_pool.shutdown(wait=True, cancel_futures=cancel)  # after the readers: they hand casts on
        for share, _, _ in self._shares:
            share.stopped = True  # chunks read by then are posted; unclaimed ones are the other ranks' to read
        # A follower still polling the store when the interpreter exits is stopped inside
        # torch's C++ store call, which aborts the process ("terminate called without an
        # active exception"): seen on a rank of a 3-rank torchrun job. It sees ``stopped``
        # within one poll.
        for follower in self._followers:
            follower.join(FOLLOWER_JOIN_SECONDS)
        for streamer in self._unique_streamers():
            streamer.close()
        for read_direct in self._direct.values():
            read_direct.close()


def _extents(refs):
    """(file, begin, end) byte ranges covering ``refs`` (in file order), neighbours merged."""
    extents: list[list] = []
    for ref in refs:
        if not ref.nbytes:
            continue
        end = ref.offset + ref.nbytes
        last = extents[-1] if extents else None
        if last is not None and last[0] == ref.file and ref.offset <= last[2] + MAP_AHEAD_GAP:
            last[2] = max(last[2], end)
        else:
            extents.append([ref.file, ref.offset, end])
    return [tuple(extent) for extent in extents]


def _wait_quietly(future: Future) -> None:
    """Wait for ``future`` to end; its outcome is someone else's to report."""
    try:
        future.exception()
    except BaseException:  # noqa: BLE001 - cancelled
        pass


def _cancel_all(chunks, first: int, error: BaseException) -> None:
    """Fail whoever waits for ``chunks[first:]`` (those already done are left as they are)."""
    for fill, index in chunks[first:]:
        fill.cancel(index, error)


def _store_failed(share, exc: BaseException):
    from fasthug_patch.errors import DistributedLoadError

    return DistributedLoadError(f"rank {share.group.rank}: the job's store failed while the ranks shared the "
                                f"reading ({type(exc).__name__}: {exc}); it stops rather than load weights never read")


def result_bytes(source, dtype) -> int:
    """The bytes ``source`` (a TensorRef or a torch.Tensor) takes once materialised as
    ``dtype`` (None: its own)."""
    own = source.torch_dtype() if isinstance(source, TensorRef) else source.dtype
    return math.prod(source.shape) * itemsize(dtype or own)


def needs_cast(source, dtype) -> bool:
    """Whether ``source`` (a TensorRef or a torch.Tensor) asked for as ``dtype`` must be cast;
    otherwise submit hands over a view of it."""
    if dtype is None:
        return False
    return dtype != (source.torch_dtype() if isinstance(source, TensorRef) else source.dtype)


def _copy_span(dst_flat, src_flat, start: int, count: int) -> None:
    """Write one span of a fresh tensor: its pages backed in one call, then the copy (a
    cast, usually)."""
    piece = dst_flat[start : start + count]
    host_memory.prefault(piece)
    piece.copy_(src_flat[start : start + count])


def _populate_span(mapped, fill: FileFill | None, ref: TensorRef, start: int, length: int, always: bool) -> None:
    filled = fill is not None and fill.wait(ref.offset + start, length)
    if always or (fill is not None and not filled):  # asked, or the fill stopped short of these bytes
        mapped.populate(ref, start, length)


def _release_and_set(mapped, ref: TensorRef, future: Future, value) -> None:
    mapped.release(ref, 0, ref.nbytes)
    future.set_result(value)


def _cast_mapped_span(dst_flat, src_flat, start: int, count: int, mapped, check_size: bool, release: bool,
                      ref: TensorRef) -> None:
    if check_size:  # bytes not populated just now: at least still inside the file
        mapped.check_size(ref)
    _copy_span(dst_flat, src_flat, start, count)
    if release:
        size = src_flat.element_size()
        mapped.release(ref, start * size, count * size)


def _read_unaligned(mapped, ref: TensorRef):
    mapped.check_size(ref)  # read here and now: still inside the file?
    return mapped.raw_bytes(ref).clone().view(ref.torch_dtype()).view(ref.shape)
