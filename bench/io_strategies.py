"""Microbenchmarks behind the engine's design choices (docs/design.md, "The engine").

Each strategy runs in a fresh process, strategies alternate, and the medians of --rounds
runs are printed. The numbers in docs/design.md came from these, on the 2-core reference VM.

    python bench/io_strategies.py cold CHECKPOINT_FILE [--threads 4,16] [--rounds 3] [--only a,b]
        same-dtype, cold page cache, until every page is resident in this process's
        mapping: mapping + MADV_POPULATE_READ; preadv fill then populate (or then a read
        per page, *_touch); POSIX_FADV_WILLNEED readahead then populate (or touch); preadv
        into fresh anonymous memory; O_DIRECT preadv into fresh memory
    python bench/io_strategies.py cast FP32_CHECKPOINT_FILE [--threads 16] [--rounds 3] [--cold]
        fp32 -> bf16 from the mapping: plain; releasing source pages after each chunk;
        prefaulting each chunk first and releasing
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fasthug_patch.bench.runner import evict as _evict  # noqa: E402

CHUNK = 16 << 20
COLD = ("populate", "fill_populate", "fill_touch", "willneed_populate", "willneed_touch", "preadv_fresh", "odirect_fresh")
WILLNEED_PIECE = 4 << 20  # the kernel caps one WILLNEED's readahead at max(read_ahead_kb, io size)
CAST = ("mapped", "mapped_release", "prefault_release")
MADV_DONTNEED, MADV_POPULATE_READ = 4, 22


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def run_cold(path: str, strategy: str, threads: int) -> float:
    import torch

    size = os.path.getsize(path)
    spans = [(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)]
    libc = _libc()
    _evict(path)
    began = time.perf_counter()
    touch = strategy.endswith("_touch")
    if strategy.startswith(("populate", "fill_", "willneed_")):
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
        base = storage.data_ptr()
        fd = os.open(path, os.O_RDONLY)
        sink = memoryview(bytearray(4 << 20))

        def job(span):
            if strategy.startswith("fill_"):  # preadv into a discard buffer: the page cache fills
                for o in range(span[0], span[0] + span[1], len(sink)):
                    os.preadv(fd, [sink[: min(len(sink), span[0] + span[1] - o)]], o)
            elif strategy.startswith("willneed_"):  # readahead without a copy to user space
                for o in range(span[0], span[0] + span[1], WILLNEED_PIECE):
                    os.posix_fadvise(fd, o, min(WILLNEED_PIECE, span[0] + span[1] - o), os.POSIX_FADV_WILLNEED)
            if not touch:
                libc.madvise(base + span[0], span[1], MADV_POPULATE_READ)
    else:
        flags = os.O_RDONLY | (os.O_DIRECT if strategy == "odirect_fresh" else 0)
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, size + 4096)  # fresh anonymous memory, page aligned
        view = memoryview(buf)

        def job(span):
            n = span[1] + (-span[1]) % 4096 if strategy == "odirect_fresh" else span[1]
            os.preadv(fd, [view[span[0] : span[0] + n]], span[0])
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(job, spans))
    if touch:  # what a load that maps on first use pays afterwards: one read per page
        view = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))
        int(view[::4096].sum())
    return time.perf_counter() - began


def run_cast(path: str, strategy: str, threads: int, cold: bool) -> float:
    import torch

    torch.set_num_threads(1)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    data_start += (-data_start) % 4096
    n = (size - data_start) // 4
    (_evict if cold else _warm)(path)
    libc = _libc()
    per = CHUNK // 4
    began = time.perf_counter()
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    base = storage.data_ptr()
    src = torch.empty(0, dtype=torch.uint8).set_(storage[data_start : data_start + 4 * n], 0, (4 * n,), (1,))
    src = src.view(torch.float32)
    dst = [torch.empty(min(per, n - e), dtype=torch.bfloat16) for e in range(0, n, per)]

    def job(i):
        e = i * per
        c = dst[i].numel()
        lo, hi = data_start + 4 * e, data_start + 4 * (e + c)
        if strategy == "prefault_release":
            libc.madvise(base + lo - lo % 4096, hi - lo + lo % 4096, MADV_POPULATE_READ)
        dst[i].copy_(src[e : e + c])
        if strategy != "mapped":
            a, b = lo + (-lo) % 4096, hi - hi % 4096
            libc.madvise(base + a, b - a, MADV_DONTNEED)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(job, range(len(dst))))
    return time.perf_counter() - began


def _child(args) -> None:
    if args.kind == "cold":
        seconds = run_cold(args.path, args.strategy, args.threads)
    else:
        seconds = run_cast(args.path, args.strategy, args.threads, args.cold)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("cold", "cast"))
    p.add_argument("path")
    p.add_argument("--threads", default="4,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="cast: evict the file first")
    p.add_argument("--only", help="comma-separated strategies (default: all of the kind)")
    p.add_argument("--strategy", help=argparse.SUPPRESS)  # set in the child process
    args = p.parse_args(argv)
    if args.strategy:
        args.threads = int(args.threads)
        _child(args)
        return 0
    strategies = COLD if args.kind == "cold" else CAST
    if args.only:
        strategies = [s for s in args.only.split(",") if s in strategies]
    results: dict[tuple, list] = {}
    for _ in range(args.rounds):
        for threads in (int(t) for t in args.threads.split(",")):
            for strategy in strategies:
                cmd = [sys.executable, os.path.abspath(__file__), args.kind, args.path, "--threads", str(threads),
                       "--strategy", strategy] + (["--cold"] if args.cold else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = proc.stdout.strip().splitlines()
                if proc.returncode != 0 or not lines:  # e.g. O_DIRECT on a filesystem without it
                    failure = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                    results.setdefault((strategy, threads), []).append({"error": failure})
                    continue
                results.setdefault((strategy, threads), []).append(json.loads(lines[-1]))
    gb = os.path.getsize(args.path) / 1e9
    print(f"{args.kind} {'(cold)' if args.cold or args.kind == 'cold' else '(warm)'} {args.path}: {gb:.2f} GB, "
          f"{args.rounds} rounds, medians (min-max)")
    for (strategy, threads), runs in results.items():
        errors = [r["error"] for r in runs if "error" in r]
        runs = [r for r in runs if "error" not in r]
        if not runs:
            print(f"  {strategy:18s} {threads:2d} threads  failed: {errors[-1]}")
            continue
        secs = [r["seconds"] for r in runs]
        print(f"  {strategy:18s} {threads:2d} threads  {statistics.median(secs):.3f} s ({min(secs):.3f}-{max(secs):.3f})"
              f"  peak RSS {max(r['peak_rss'] for r in runs) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
