"""ranks.py: ranks of one job agree on a load and split its reading; failures reach all.

The ranks here are threads sharing an in-process store (torch's HashStore), each with its
own Materializer, so the protocol and the split run without launching processes;
tests/test_torchrun.py does the same through torchrun and gloo.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from fasthug_patch import ranks
from fasthug_patch.engine import Materializer
from fasthug_patch.errors import DistributedLoadError
from fasthug_patch.plan import CheckpointIndex


def _group(store, rank, world, host="h", join=2.0, timeout=5.0):
    return ranks.PeerGroup(store, rank, world, host, join, timeout, run_id=f"test-{id(store)}")


def _in_threads(world, fn):
    results, errors = [None] * world, [None] * world

    def run(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_every_chunk_has_exactly_one_owner_and_parts_are_near_equal(count):
    chunks = [("a", i, 16) for i in range(7)] + [("b", i, 16) for i in range(3)] + [("b", 3, 5), ("c", 0, 1)]
    parts = [ranks.owned_chunks(chunks, index, count) for index in range(count)]
    everything = {(name, i) for name, i, _ in chunks}
    assert set().union(*parts) == everything
    assert sum(len(p) for p in parts) == len(everything)
    sizes = {(name, i): n for name, i, n in chunks}
    total = sum(sizes.values())
    for part in parts:
        assert abs(sum(sizes[c] for c in part) - total / count) <= 16


def test_all_ranks_joining_the_same_files_share():
    store = dist.HashStore()
    shares, errors = _in_threads(3, lambda r: _group(store, r, 3).agree("files-1"))
    assert errors == [None] * 3
    assert sorted(s.index for s, _ in shares) == [0, 1, 2]
    assert all(s.count == 3 and s.peers == [0, 1, 2] for s, _ in shares)


def test_ranks_on_two_hosts_split_per_host():
    store = dist.HashStore()
    shares, _ = _in_threads(4, lambda r: _group(store, r, 4, host=f"node{r % 2}").agree("f"))
    assert [s.peers for s, _ in shares] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [s.index for s, _ in shares] == [0, 0, 1, 1]


def test_a_rank_that_never_comes_makes_the_others_read_alone_and_a_late_one_does_not_wait():
    store = dist.HashStore()
    began = time.perf_counter()
    results, _ = _in_threads(2, lambda r: _group(store, r, 3, join=0.3).agree("f"))
    assert all(share is None and "not every rank" in why for share, why in results)
    assert time.perf_counter() - began < 5
    began = time.perf_counter()
    share, why = _group(store, 2, 3, join=30).agree("f")
    assert share is None and "already loaded" in why
    assert time.perf_counter() - began < 5


def test_ranks_loading_different_files_read_alone():
    store = dist.HashStore()
    results, _ = _in_threads(2, lambda r: _group(store, r, 2, join=0.3).agree(f"files-of-rank-{r}"))
    assert all(share is None for share, _ in results)


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    tensors = {f"w{i}": torch.randn(256, 1024, dtype=torch.float32) for i in range(6)}
    tensors["small"] = torch.arange(10, dtype=torch.int64)
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    return path, tensors


def _load_as_rank(store, rank, world, path, dtype=None, group_kwargs=None, before_fill=None):
    engine = Materializer(threads=3, chunk_bytes=256 << 10, populate=None, io_mode="read")
    try:
        if before_fill is not None:
            before_fill(engine)
        engine.prepare([path], _group(store, rank, world, **(group_kwargs or {})))
        refs = CheckpointIndex().tensors([path])
        got = {name: engine.submit(ref, dtype if ref.torch_dtype().is_floating_point else None).result(timeout=30)
               for name, ref in refs.items()}
        return got, engine.bytes_filled, engine.sharing
    finally:
        engine.close()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_shared_load_reads_the_file_once_between_ranks_and_every_rank_gets_it_all(checkpoint, world, dtype):
    path, tensors = checkpoint
    store = dist.HashStore()
    results, errors = _in_threads(world, lambda r: _load_as_rank(store, r, world, path, dtype))
    assert errors == [None] * world
    assert sum(filled for _, filled, _ in results) == os.path.getsize(path)
    for got, filled, sharing in results:
        assert 0 < filled < os.path.getsize(path) and sharing.startswith("shared: rank")
        for name, want in tensors.items():
            want = want.to(dtype) if dtype is not None and want.is_floating_point() else want
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_a_rank_whose_read_fails_makes_every_rank_raise(checkpoint, monkeypatch):
    path, _ = checkpoint
    store = dist.HashStore()
    from fasthug_patch.engine import filler

    real_open = filler.FileFill._open
    broken = set()  # ids of the fills of "rank 1", whose disk fails

    def open_fill(self):
        if id(self) in broken:
            raise OSError(5, "Input/output error")
        return real_open(self)

    monkeypatch.setattr(filler.FileFill, "_open", open_fill)
    real_choose = Materializer._choose

    def choose(self, name, size, owned=None):
        real_choose(self, name, size, owned)
        if getattr(self, "rank_for_test", None) == 1:
            broken.add(id(self._fills[name]))

    monkeypatch.setattr(Materializer, "_choose", choose)

    def rank_fn(rank):
        return _load_as_rank(store, rank, 2, path, before_fill=lambda engine: setattr(engine, "rank_for_test", rank))

    began = time.perf_counter()
    _, errors = _in_threads(2, rank_fn)
    assert isinstance(errors[0], DistributedLoadError) and "rank 1 failed" in str(errors[0])
    assert "Input/output error" in str(errors[0])
    assert errors[1] is not None  # its own read error, naming the file
    assert time.perf_counter() - began < 5  # nobody waited for a timeout


def test_a_rank_that_stops_after_joining_times_out_every_waiter(checkpoint):
    path, _ = checkpoint
    store = dist.HashStore()
    joined = threading.Event()

    def silent_rank():
        _group(store, 1, 2).agree(ranks.fingerprint([(path, os.path.getsize(path))]))
        joined.set()  # and never posts done

    t = threading.Thread(target=silent_rank)
    t.start()
    began = time.perf_counter()
    with pytest.raises(DistributedLoadError, match=r"rank\(s\) \[1\] did not finish"):
        _load_as_rank(store, 0, 2, path, group_kwargs={"timeout": 0.5})
    assert time.perf_counter() - began < 10
    t.join()
