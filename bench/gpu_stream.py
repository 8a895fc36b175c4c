"""The streaming engine alone, on a GPU machine: page-cached safetensors file -> GPU.

    python bench/gpu_stream.py [--gb 4] [--shapes 16x32,8x16] [--threads 4,8,16]

Prints, per ring shape and reader-thread count, the pinned ring's allocation time and the
throughput of DeviceStreamer over every tensor of the file (all futures done), next to the
pinned and pageable host-to-device ceilings and one thread's preadv from the page cache.
Used to pick the defaults in settings.py; the end-to-end numbers are in bench/suite.py.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import torch
    from safetensors.torch import save_file

    from fasthug_patch.bench import ceiling
    from fasthug_patch.engine import devices, ring
    from fasthug_patch.engine.materialize import Materializer, _Assembly
    from fasthug_patch.engine.to_device import DeviceStreamer
    from fasthug_patch.plan import CheckpointIndex

    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=4.0)
    p.add_argument("--shapes", default="16x32,8x16,4x64,32x8,8x64")
    p.add_argument("--threads", default="4,8,16")
    p.add_argument("--spin", action="store_true", help="also try spin-wait events")
    p.add_argument("--probe", action="store_true", help="only the host-side probes: parallel preadv into "
                   "pinned memory, and cudaHostRegister of the page-cached file's mapping")
    args = p.parse_args()
    print("h2d:", ceiling.h2d_gbps())
    path = os.path.join(tempfile.mkdtemp(dir=os.path.expanduser("~")), "m.safetensors")
    per = 4096 * 11008 * 2
    n = max(1, int(args.gb * 1e9 // per))
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {f"t{i}": torch.randn(4096, 11008, device="cuda", generator=gen).to(torch.bfloat16).cpu()
               for i in range(n)}
    save_file(tensors, path)
    del tensors
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    size = os.path.getsize(path)
    refs = CheckpointIndex().tensors([path])
    fd = os.open(path, os.O_RDONLY)
    buf = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    t0 = time.perf_counter()
    off = 0
    while off < size:
        got = os.preadv(fd, [memoryview(buf.numpy())], off)
        off += got
    print(f"one thread preadv page cache -> pinned: {size / (time.perf_counter() - t0) / 1e9:.2f} GB/s")
    os.close(fd)
    print(f"file {size / 1e9:.2f} GB, {len(refs)} tensors")
    if args.probe:
        probe(path, size)
        return 0
    print("| ring | events | threads | ring alloc s | stream s | GB/s |")
    for spin in ([False, True] if args.spin else [False]):
        for shape in args.shapes.split(","):
            slots, mib = (int(x) for x in shape.split("x"))
            backend = devices.CudaBackend("cuda:0", blocking_events=not spin)
            t0 = time.perf_counter()
            staging = ring.StagingRing(backend, slots, mib << 20)
            alloc = time.perf_counter() - t0
            for threads in (int(x) for x in args.threads.split(",")):
                for _ in range(2):  # second is the one reported (first warms the allocator)
                    engine = Materializer(threads, 16 << 20, None)
                    streamer = DeviceStreamer(backend, staging, engine._run, _Assembly)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    futures = [streamer.submit_ref(r, None) for r in refs.values()]
                    outs = [f.result() for f in futures]
                    torch.cuda.synchronize()
                    took = time.perf_counter() - t0
                    engine.close()
                    streamer.close()
                    del outs, futures
                print(f"| {shape} | {'spin' if spin else 'blocking'} | {threads} | {alloc:.3f} | {took:.3f} "
                      f"| {size / took / 1e9:.1f} |", flush=True)
            del staging
    return 0


def probe(path: str, size: int) -> None:
    """Where the host side's time goes: N threads of preadv (page cache -> pinned) with no
    device copy; and pinning the file's own pages (cudaHostRegister, read-only) instead."""
    import mmap

    import torch

    from fasthug_patch.bench.ceiling import _run_threads, pread_full

    chunk = 32 << 20
    pieces = [(off, min(chunk, size - off)) for off in range(0, size, chunk)]
    for nthreads in (1, 4, 8, 16):
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(nthreads)]  # before timing
        fd = os.open(path, os.O_RDONLY)
        took = _run_threads(nthreads, pieces, lambda buf, off, n: pread_full(fd, memoryview(buf.numpy())[:n], off),
                            make_buffer=bufs.pop)
        os.close(fd)
        print(f"preadv page cache -> pinned, {nthreads} threads: {size / took / 1e9:.1f} GB/s")
    cudart = torch.cuda.cudart()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    arr = torch.frombuffer(m, dtype=torch.uint8)
    base = arr.data_ptr()
    for flags, label in ((8, "read-only"),):
        t0 = time.perf_counter()
        err = cudart.cudaHostRegister(base, size, flags)
        reg = time.perf_counter() - t0
        dst = torch.empty(size, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(arr, non_blocking=True)
        torch.cuda.synchronize()
        dma = time.perf_counter() - t0
        print(f"cudaHostRegister({label}) of {size / 1e9:.2f} GB mapped page cache: error {err}, "
              f"{reg:.3f}s ({size / reg / 1e9:.1f} GB/s); then DMA {dma:.3f}s ({size / dma / 1e9:.1f} GB/s)")
        t0 = time.perf_counter()
        cudart.cudaHostUnregister(base)
        print(f"cudaHostUnregister: {time.perf_counter() - t0:.3f}s")
        del dst
    # Chunked, on several threads at once (what DeviceStreamer.pin_file does)
    from concurrent.futures import ThreadPoolExecutor

    for mib, nthreads in ((256, 1), (256, 8), (256, 16), (64, 16)):
        step = mib << 20
        spans = [(off, min(step, size - off)) for off in range(0, size, step)]
        with ThreadPoolExecutor(nthreads) as pool:
            t0 = time.perf_counter()
            errors = list(pool.map(lambda span: cudart.cudaHostRegister(base + span[0], span[1], 8), spans))
            reg = time.perf_counter() - t0
            t0 = time.perf_counter()
            list(pool.map(lambda span: cudart.cudaHostUnregister(base + span[0]), spans))
            unreg = time.perf_counter() - t0
        print(f"cudaHostRegister in {mib} MiB chunks on {nthreads} threads: {size / reg / 1e9:.1f} GB/s "
              f"({reg:.3f}s, errors {sorted(set(int(getattr(e, 'value', e)) for e in errors))}); "
              f"unregister {unreg:.3f}s")


if __name__ == "__main__":
    raise SystemExit(main())
