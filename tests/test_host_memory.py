"""engine/host_memory: cast destinations on huge pages (opt-in), same bits as torch."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import save_file

from fasthug_patch.engine import Materializer, host_memory
from fasthug_patch.plan import CheckpointIndex

needs_thp = pytest.mark.skipif(host_memory.thp_mode() not in ("always", "madvise"),
                               reason="kernel without transparent huge pages")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def test_off_by_default_gives_torchs_own_allocation(monkeypatch):
    monkeypatch.delenv("FASTHUG_HUGE_PAGES", raising=False)
    t = host_memory.empty((1024, 2048), torch.float32)
    assert t.untyped_storage().resizable()  # torch's allocator, not a mapping


@needs_thp
def test_large_tensor_on_an_aligned_mapping_small_one_not(monkeypatch):
    monkeypatch.setenv("FASTHUG_HUGE_PAGES", "1")
    big = host_memory.empty((1024, 2048), torch.float32)  # 8 MiB
    assert big.shape == (1024, 2048) and big.dtype == torch.float32 and big.is_contiguous()
    assert big.data_ptr() % host_memory.HUGE_PAGE == 0
    assert not big.untyped_storage().resizable()
    small = host_memory.empty((1000,), torch.bfloat16)
    assert small.untyped_storage().resizable()


@needs_thp
def test_mapping_is_released_with_the_tensor(monkeypatch):
    monkeypatch.setenv("FASTHUG_HUGE_PAGES", "1")
    before = _rss_bytes()
    t = host_memory.empty((64 << 20,), torch.uint8)
    t.fill_(1)
    assert _rss_bytes() - before >= 60 << 20
    del t
    gc.collect()
    assert _rss_bytes() - before < 16 << 20


@needs_thp
@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16, torch.float16])
def test_casts_onto_huge_pages_equal_torch_bitwise(tmp_path, monkeypatch, target):
    monkeypatch.setenv("FASTHUG_HUGE_PAGES", "1")
    torch.manual_seed(0)
    source = (torch.randn(2048, 2048) * 1e3).to(torch.bfloat16 if target == torch.float32 else torch.float32)
    source.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).to(source.dtype)
    path = str(tmp_path / "w.safetensors")
    save_file({"w": source}, path)
    ref = CheckpointIndex().tensors([path])["w"]
    engine = Materializer(threads=2, chunk_bytes=1 << 20, populate=None)
    try:
        got = engine.submit(ref, target).result()
    finally:
        engine.close()
    want = source.to(target)
    assert got.dtype == target and got.shape == want.shape
    assert got.view(torch.uint8).numpy().tobytes() == want.view(torch.uint8).numpy().tobytes()
    assert got.data_ptr() % host_memory.HUGE_PAGE == 0


def test_unreadable_thp_mode_means_plain_allocation(monkeypatch):
    monkeypatch.setenv("FASTHUG_HUGE_PAGES", "1")
    monkeypatch.setattr(host_memory, "THP_MODE_FILE", "/nonexistent/thp")
    host_memory.thp_mode.cache_clear()
    try:
        assert host_memory.thp_mode() == ""
        assert host_memory.empty((1024, 2048), torch.float32).untyped_storage().resizable()
    finally:
        host_memory.thp_mode.cache_clear()


def _resident_pages(tensor) -> tuple[int, int]:
    """(resident, all) of the pages wholly inside ``tensor``'s bytes (mincore)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    begin = tensor.data_ptr() + (-tensor.data_ptr()) % mmap.PAGESIZE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    end -= end % mmap.PAGESIZE
    pages = (end - begin) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(begin, end - begin, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec), pages


def test_prefault_backs_fresh_pages_without_changing_them():
    import mmap

    mapping = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # never touched
    fresh = torch.frombuffer(mapping, dtype=torch.float32)
    piece = fresh[1000:3_000_000]  # starts and ends inside pages
    assert _resident_pages(piece)[0] == 0
    host_memory.prefault(piece)
    if not host_memory._populate_write_works:
        pytest.skip("kernel without MADV_POPULATE_WRITE")
    resident, pages = _resident_pages(piece)
    assert resident == pages > 2900
    assert _resident_pages(fresh[3_001_024:])[0] == 0  # nothing past it
    assert int(piece.count_nonzero()) == 0
    del fresh, piece


def test_casts_hold_at_most_cast_threads_slots(tmp_path, monkeypatch):
    import threading

    from fasthug_patch.engine import materialize

    monkeypatch.setenv("FASTHUG_CAST_THREADS", "2")
    tensors = {f"w{i}": torch.randn(512, 1024) for i in range(8)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    busy, most, lock = [0], [0], threading.Lock()
    real = host_memory.prefault

    def counting(piece):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            threading.Event().wait(0.01)  # long enough for the other threads to pile up
            real(piece)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(host_memory, "prefault", counting)
    engine = Materializer(threads=8, chunk_bytes=256 << 10, populate=None)
    try:
        refs = CheckpointIndex().tensors([path])
        got = {name: engine.submit(ref, torch.bfloat16) for name, ref in refs.items()}
        for name, future in got.items():
            assert torch.equal(future.result(timeout=30), tensors[name].to(torch.bfloat16)), name
    finally:
        engine.close()
    assert most[0] == 2, most[0]
    assert materialize.settings.cast_threads() == 2
