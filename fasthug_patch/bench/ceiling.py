"""Physical ceilings, measured on the machine and checkpoint of the benchmark.

* memory copy bandwidth: a large torch tensor copy, into prefaulted memory and into
  freshly allocated memory (which pays the page faults a loader pays);
* fresh-memory write bandwidth: a new process allocates a buffer and writes every byte of
  it once (torch's fill_, on all cores), as a cast load must write its result. The memcpy
  figure above reuses memory its own process just freed, which some hypervisors back more
  cheaply than the memory a new process gets; this one is the floor of a cast load;
* warm page-cache read bandwidth through mmap: the checkpoint's files mapped afresh and
  copied out in 16 MiB chunks (1 thread and one per core, best);
* cold parallel disk read bandwidth: evict the files, then N threads of os.preadv in
  16 MiB chunks over them, for N in 1, 2, 4, 8, 16 (best);
* on a GPU: host-to-device copy bandwidth from pinned and from pageable memory.

All in GB/s (1e9 bytes per second).

    python -m fasthug_patch.bench.ceiling --path CHECKPOINT   # one JSON line
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import threading
import time

from fasthug_patch.bench import checkpoints
from fasthug_patch.bench.runner import evict, residency

CHUNK = 16 << 20
THREADS = (1, 2, 4, 8, 16)


def memcpy_gbps(nbytes: int = 512 << 20, repeats: int = 3) -> dict:
    """Best-of-``repeats`` bandwidth of a ``nbytes`` torch copy: into a prefaulted
    destination, and into a freshly allocated one."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    best = best_fresh = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    del dst
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = torch.empty(nbytes, dtype=torch.uint8)
        fresh.copy_(src)
        best_fresh = max(best_fresh, nbytes / (time.perf_counter() - t0) / 1e9)
        del fresh
    return {"memcpy_gbps": best, "fresh_memcpy_gbps": best_fresh, "memcpy_bytes": nbytes}


FRESH_WRITE_MIN, FRESH_WRITE_MAX = 256 << 20, 8 << 30
_FRESH_WRITE = """
import sys, time, torch
n = int(sys.argv[1])
t0 = time.perf_counter()
torch.empty(n, dtype=torch.uint8).fill_(1)
print(n / (time.perf_counter() - t0) / 1e9)
"""


def fresh_write_gbps(nbytes: int, repeats: int = 3, python: str | None = None) -> dict:
    """Best-of-``repeats`` bandwidth of allocating ``nbytes`` and writing each byte once,
    each repeat in a new process (after its imports, which are not timed), with ``python``
    (default: this interpreter). Measure it at the size of the result a load writes: on
    the reference VM the figure falls with the size (3.8-4.1 GB/s for 2 GiB, 2.8-2.9 GB/s
    for 4.3 GiB) and varies run to run."""
    import subprocess
    import sys

    best = 0.0
    for _ in range(repeats):
        proc = subprocess.run([python or sys.executable, "-c", _FRESH_WRITE, str(nbytes)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return {}
        best = max(best, float(proc.stdout.split()[-1]))
    return {"fresh_write_gbps": best, "fresh_write_bytes": nbytes}


_BARE_CAST = """
import ctypes, json, os, struct, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
dtype, threads, files = getattr(torch, sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
floating = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
libc = ctypes.CDLL(None)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MADV_POPULATE_WRITE, CHUNK = 23, 16 << 20
t0 = time.perf_counter()
jobs = []
for path in files:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    raw = torch.empty(0, dtype=torch.uint8).set_(
        torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path)))
    for name, info in header.items():
        source = floating.get(info.get("dtype")) if name != "__metadata__" else None
        if source is None or source == dtype:
            continue
        begin, end = info["data_offsets"]
        src = raw[8 + n + begin:8 + n + end]
        src = src.view(source) if src.data_ptr() % source.itemsize == 0 else src.clone().view(source)
        dst = torch.empty(src.numel(), dtype=dtype)
        step = max(1, CHUNK // src.element_size())
        jobs += [(src, dst, start, step) for start in range(0, src.numel(), step)]
def cast(job):
    src, dst, start, step = job
    piece = dst[start:start + step]
    first = piece.data_ptr() & ~4095  # back the pages in one call, as the engine does
    libc.madvise(first, piece.data_ptr() + piece.nbytes - first, MADV_POPULATE_WRITE)
    piece.copy_(src[start:start + step])
with ThreadPoolExecutor(threads) as pool:
    list(pool.map(cast, jobs))
print(len(jobs), time.perf_counter() - t0)
"""


def bare_cast_seconds(files, dtype: str, repeats: int = 3, python: str | None = None,
                      threads: int | None = None) -> dict:
    """Best-of-``repeats`` time for a new process to cast every floating tensor of the
    safetensors ``files`` (page-cached: run it after a warm load) to ``dtype`` ("bfloat16",
    ...) into fresh memory: mapping, reading and writing included, imports not; 16 MiB
    pieces, each backed in one madvise and cast, on ``threads`` (default: one per core).
    The least a cast load must do. {} if it cannot run or finds nothing to cast."""
    import subprocess
    import sys

    threads = threads or os.cpu_count() or 1
    best = None
    for _ in range(repeats):
        proc = subprocess.run([python or sys.executable, "-c", _BARE_CAST, dtype, str(threads), *map(str, files)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return {}
        jobs, seconds = proc.stdout.split()[-2:]
        if int(jobs) == 0:
            return {}
        best = float(seconds) if best is None else min(best, float(seconds))
    return {"bare_cast_s": best, "bare_cast_dtype": dtype, "bare_cast_threads": threads}


def h2d_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Best host-to-device copy bandwidth of ``nbytes`` from pinned and from pageable
    memory (CUDA only; {} without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    out = {"h2d_bytes": nbytes, "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for kind in ("pinned", "pageable"):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=kind == "pinned")
        best = 0.0
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=kind == "pinned")
            torch.cuda.synchronize()
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
        out[f"h2d_{kind}_gbps"] = best
        del src
    try:
        import subprocess

        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _chunks(files, limit: int | None):
    out, total = [], 0
    for name in files:
        size = os.path.getsize(name)
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            if limit is not None and total >= limit:
                return out, total
            out.append((name, off, n))
            total += n
    return out, total


def pread_full(fd: int, view: memoryview, offset: int) -> None:
    """preadv until ``view`` is full or the file ends."""
    got = 0
    while got < len(view):
        r = os.preadv(fd, [view[got:]], offset + got)
        if r <= 0:
            break
        got += r


def _run_threads(nthreads: int, chunks, work, make_buffer=lambda: bytearray(CHUNK)) -> float:
    """Seconds for ``nthreads`` threads to run ``work(buffer, *chunk)`` over ``chunks``; each
    thread gets one buffer from ``make_buffer``."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    for c in chunks:
        q.put(c)
    errors = []

    def worker():
        buf = make_buffer()
        try:
            while True:
                try:
                    c = q.get_nowait()
                except queue.Empty:
                    return
                work(buf, *c)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(nthreads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def mmap_warm_gbps(path, threads=None, repeats: int = 2, limit: int | None = 4 << 30) -> dict:
    """Read the (page-cached) checkpoint through fresh mmaps, copying 16 MiB chunks out."""
    import numpy as np

    files = checkpoints.weight_files(path)
    chunks, total = _chunks(files, limit)
    if residency(path) < 0.99:  # warm it: one plain read
        for name, off, n in chunks:
            with open(name, "rb") as f:
                f.seek(off)
                f.read(n)
    threads = threads or sorted({1, os.cpu_count() or 1})
    results = {}
    for nt in threads:
        best = 0.0
        for _ in range(repeats):
            maps = {}
            for name in files:
                with open(name, "rb") as f:
                    maps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            arrays = {name: np.frombuffer(m, dtype=np.uint8) for name, m in maps.items()}

            def work(buf, name, off, n, arrays=arrays):
                np.copyto(np.frombuffer(buf, dtype=np.uint8, count=n), arrays[name][off:off + n])

            elapsed = _run_threads(nt, chunks, work)
            best = max(best, total / elapsed / 1e9)
            del work, arrays
            for m in maps.values():
                m.close()
        results[nt] = best
    best_n = max(results, key=results.get)
    return {"mmap_warm_gbps": results[best_n], "mmap_warm_by_threads": results,
            "mmap_warm_best_threads": best_n, "mmap_warm_bytes": total}


def cold_read_gbps(path, threads=THREADS, limit: int | None = 4 << 30) -> dict:
    """Evict, then N threads of os.preadv in 16 MiB chunks; best over N."""
    files = checkpoints.weight_files(path)
    chunks, total = _chunks(files, limit)
    results, resident_after_evict = {}, 0.0
    fds = {}
    try:
        for nt in threads:
            evict(path)
            resident_after_evict = max(resident_after_evict, residency(path))
            for name in files:
                fds[name] = os.open(name, os.O_RDONLY)

            def work(buf, name, off, n):
                pread_full(fds[name], memoryview(buf)[:n], off)

            elapsed = _run_threads(nt, chunks, work)
            results[nt] = total / elapsed / 1e9
            for fd in fds.values():
                os.close(fd)
            fds.clear()
    finally:
        for fd in fds.values():
            os.close(fd)
    best_n = max(results, key=results.get)
    out = {"cold_read_gbps": results[best_n], "cold_read_by_threads": results,
           "cold_read_best_threads": best_n, "cold_read_bytes": total,
           "resident_after_evict": resident_after_evict}
    if resident_after_evict > 0.5:
        out["note"] = (f"eviction did not take ({resident_after_evict * 100:.0f}% still resident): "
                       "the cold figure is not a disk figure")
    return out


def measure_all(path, threads=THREADS) -> dict:
    began = time.perf_counter()
    out = {"path": os.fspath(path)}
    out.update(memcpy_gbps())
    # As large as the checkpoint (bounded): how much fresh memory a load asks for changes the figure.
    out.update(fresh_write_gbps(min(max(checkpoints.weight_bytes(path), FRESH_WRITE_MIN), FRESH_WRITE_MAX)))
    out.update(h2d_gbps())
    out.update(cold_read_gbps(path, threads))
    out.update(mmap_warm_gbps(path))  # last: leaves the checkpoint in the page cache
    out["seconds"] = time.perf_counter() - began
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasthug_patch.bench.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--path", required=True)
    p.add_argument("--threads", default=os.environ.get("FASTHUG_CEILING_THREADS") or ",".join(map(str, THREADS)),
                   help="cold-read thread counts, e.g. 1,2,4 (default: $FASTHUG_CEILING_THREADS or 1,2,4,8,16)")
    args = p.parse_args(argv)
    threads = tuple(int(x) for x in args.threads.split(",") if x.strip())
    result = measure_all(args.path, threads)
    result = json.loads(json.dumps(result))  # int keys -> str
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
