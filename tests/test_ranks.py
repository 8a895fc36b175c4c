"""ranks.py: ranks of one job split the reading of a checkpoint by claiming chunks; failures reach all.

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
from fasthug_patch.engine import Materializer, filler
from fasthug_patch.errors import DistributedLoadError
from fasthug_patch.plan import CheckpointIndex


def _group(store, rank, world, host="h", timeout=5.0):
    return ranks.PeerGroup(store, rank, world, host, timeout, run_id=f"test-{id(store)}")


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


def _claim_all(share):
    got = []
    while (chunk := share.claim()) is not None:
        got.append(chunk)
    return got


@pytest.mark.parametrize("slots", [1, 2, 3, 5])
def test_home_ranges_cover_every_chunk_once_with_near_equal_bytes(slots):
    lengths = [16] * 10 + [5, 1]
    found = ranks.home_ranges(lengths, slots)
    assert found[0][0] == 0 and found[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(found, found[1:]))  # consecutive, no gap, no overlap
    total = sum(lengths)
    for first, end in found:
        assert abs(sum(lengths[first:end]) - total / slots) <= 16


def test_each_rank_claims_its_own_range_first_then_helps_with_the_others():
    store = dist.HashStore()
    lengths = [1] * 6
    a, b = (_group(store, rank, 2).share("files", lengths) for rank in range(2))
    assert [a.claim() for _ in range(3)] == [0, 1, 2]  # rank 0's home range
    assert b.claim() == 3  # rank 1 starts in its own
    assert a.claim() == 4  # rank 0, done with its range, takes from rank 1's
    assert b.claim() == 5
    assert a.claim() is None and b.claim() is None
    assert (a.claimed, b.claimed) == (4, 2)


def test_claims_from_many_threads_give_every_chunk_to_exactly_one_rank():
    store = dist.HashStore()
    lengths = [3] * 50
    shares = [_group(store, rank, 3).share("files", lengths) for rank in range(3)]
    results, errors = _in_threads(6, lambda i: _claim_all(shares[i % 3]))
    assert errors == [None] * 6
    claimed = [chunk for got in results for chunk in got]
    assert sorted(claimed) == list(range(50))


def test_a_rank_alone_claims_everything_and_a_late_one_nothing():
    store = dist.HashStore()
    lengths = [1] * 7
    alone = _group(store, 0, 3).share("files", lengths)  # ranks 1 and 2 never load these files
    assert sorted(_claim_all(alone)) == list(range(7))
    for chunk in range(7):
        alone.post(chunk)
    late = _group(store, 1, 3).share("files", lengths)
    assert late.claim() is None
    assert all(late.wait(chunk, f"chunk {chunk}") for chunk in range(7))


def test_other_hosts_and_other_files_never_share_claims():
    store = dist.HashStore()
    lengths = [1] * 4
    node0 = _group(store, 0, 2, host="node0").share("files", lengths)
    node1 = _group(store, 1, 2, host="node1").share("files", lengths)
    other = _group(store, 0, 2, host="node0").share("other files", lengths)
    for share in (node0, node1, other):
        assert sorted(_claim_all(share)) == list(range(4))


def test_local_rank_picks_the_home_range_on_a_host():
    store = dist.HashStore()
    group = ranks.PeerGroup(store, 5, 8, "node1", 5.0, run_id="r", slot=1, slots=4)
    share = group.share("files", [1] * 8)
    assert (share.slot, share.slots) == (1, 4)
    assert share.claim() == 2


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    tensors = {f"w{i}": torch.randn(256, 1024, dtype=torch.float32) for i in range(6)}
    tensors["small"] = torch.arange(10, dtype=torch.int64)
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    return path, tensors


CHUNK = 256 << 10


def _load_as_rank(store, rank, world, path, dtype=None, group_kwargs=None, names=None):
    engine = Materializer(threads=3, chunk_bytes=CHUNK, populate=None, io_mode="read")
    try:
        engine.prepare([path], _group(store, rank, world, **(group_kwargs or {})))
        refs = CheckpointIndex().tensors([path])
        refs = {name: ref for name, ref in refs.items() if names is None or name in names}
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
        assert sharing.startswith("shared: rank"), sharing
        for name, want in tensors.items():
            want = want.to(dtype) if dtype is not None and want.is_floating_point() else want
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


def test_a_rank_whose_read_fails_makes_every_rank_raise(checkpoint, monkeypatch):
    path, _ = checkpoint
    store = dist.HashStore()
    real_open = filler.FileFill._open
    disk_broken = [True]

    def open_fill(self):
        if disk_broken[0]:
            raise OSError(5, "Input/output error")
        return real_open(self)

    monkeypatch.setattr(filler.FileFill, "_open", open_fill)
    # Rank 1 loads first, alone: it claims every chunk, and every read of it fails.
    with pytest.raises(Exception, match="Input/output error") as own:
        _load_as_rank(store, 1, 2, path)
    disk_broken[0] = False
    assert not isinstance(own.value, DistributedLoadError)  # its own error, naming the file
    assert path in str(own.value)
    began = time.perf_counter()
    with pytest.raises(DistributedLoadError, match="rank 1 failed to read bytes 0..") as peer:
        _load_as_rank(store, 0, 2, path)
    assert "Input/output error" in str(peer.value) and path in str(peer.value)
    assert time.perf_counter() - began < 5  # nobody waited for a timeout


def test_a_rank_that_stops_after_claiming_times_out_every_waiter(checkpoint):
    path, _ = checkpoint
    store = dist.HashStore()
    size = os.path.getsize(path)
    lengths = [length for _, length in filler.spans(size, CHUNK)]
    silent = _group(store, 1, 2).share(ranks.fingerprint([(path, size)]), lengths)
    taken = silent.claim()  # and never reads it nor posts
    began = time.perf_counter()
    with pytest.raises(DistributedLoadError, match=r"rank 1 claimed bytes \d+\.\.\d+ of .* did not finish"):
        _load_as_rank(store, 0, 2, path, group_kwargs={"timeout": 0.5})
    assert taken == ranks.home_ranges(lengths, 2)[1][0]
    assert time.perf_counter() - began < 10


class _SlowStore:
    """A job's store over a network: a check for a key not set yet takes a while."""

    def __init__(self, store) -> None:
        self._store = store

    def check(self, keys):
        found = self._store.check(keys)
        if not found:
            time.sleep(0.2)
        return found

    def __getattr__(self, name):
        return getattr(self._store, name)


def test_a_load_that_ends_before_its_peers_leaves_no_thread_polling_the_store(checkpoint):
    """The follower of a share must be gone when the load closes: one left polling a
    TCPStore when the interpreter exits is killed inside torch's C++ call, which aborts
    the process (a rank of a torchrun job died with SIGABRT after its load)."""
    path, tensors = checkpoint
    store = _SlowStore(dist.HashStore())
    size = os.path.getsize(path)
    lengths = [length for _, length in filler.spans(size, CHUNK)]
    silent = _group(store, 1, 2).share(ranks.fingerprint([(path, size)]), lengths)
    assert silent.claim() == ranks.home_ranges(lengths, 2)[1][0]  # never read: the follower waits for it
    got, _, _ = _load_as_rank(store, 0, 2, path, names={"w0", "w1"}, group_kwargs={"timeout": 60})
    assert torch.equal(got["w0"], tensors["w0"]) and torch.equal(got["w1"], tensors["w1"])
    assert [t.name for t in threading.enumerate() if t.name == "fasthug-ranks"] == []


def test_a_late_rank_reads_nothing_and_loads_everything(checkpoint):
    path, tensors = checkpoint
    store = dist.HashStore()
    _, filled0, _ = _load_as_rank(store, 0, 2, path)  # rank 1 is not there yet: rank 0 reads it all
    got, filled1, sharing = _load_as_rank(store, 1, 2, path)
    assert (filled0, filled1) == (os.path.getsize(path), 0)
    assert sharing.startswith("shared: rank 1 read 0 of ")
    for name, want in tensors.items():
        assert torch.equal(got[name], want), name


class _BrokenStore:
    """A job's store that has gone away (its server rank died): every request fails."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError("Connection reset by peer")
        return fail


def test_a_store_that_fails_makes_the_rank_raise_at_once_not_wait(checkpoint):
    path, _ = checkpoint
    began = time.perf_counter()
    with pytest.raises(DistributedLoadError, match="the job's store failed .*Connection reset by peer"):
        _load_as_rank(_BrokenStore(), 0, 2, path)
    assert time.perf_counter() - began < 5  # not the 5 s timeout, nor FASTHUG_DIST_TIMEOUT_S
