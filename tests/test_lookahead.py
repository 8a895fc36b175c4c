"""Reading ahead of a one-at-a-time consumer within a byte budget (lookahead.py), and the
5.x adapter's use of it when bitsandbytes quantises on the fly to a GPU (the CPU stand-in
device plays the GPU)."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fasthug_patch import lookahead as lookahead_module
from fasthug_patch.lookahead import Lookahead


class _Source:
    """Records submissions; each returns a finished Future of a fresh object."""

    def __init__(self) -> None:
        self.submitted: list[int] = []

    def request(self, index: int):
        def submit():
            self.submitted.append(index)
            future: Future = Future()
            future.set_result(torch.full((4,), float(index)))
            return future

        return submit


def _queue(sizes, budget):
    source, ahead = _Source(), Lookahead(budget)
    takes = [ahead.add(size, source.request(i)).result for i, size in enumerate(sizes)]
    return source, ahead, takes


def test_nothing_is_read_before_the_first_take_and_then_only_within_the_budget():
    source, ahead, takes = _queue([10] * 10, budget=35)
    assert source.submitted == []
    assert float(takes[0]()[0]) == 0
    # after taking #0: #1..#3 are ahead (30 bytes); #4 would make 40 > 35
    assert source.submitted == [0, 1, 2, 3]
    for i in range(1, 10):
        assert float(takes[i]()[0]) == i
    assert source.submitted == list(range(10))
    assert ahead.most_ahead <= 35 + 10  # the budget, plus the one being taken


def test_a_request_larger_than_the_budget_still_goes_when_nothing_is_ahead():
    source, _, takes = _queue([100, 5, 200, 5], budget=50)
    assert [float(take()[0]) for take in takes] == [0, 1, 2, 3]
    assert source.submitted == [0, 1, 2, 3]


def test_a_request_taken_out_of_order_is_submitted_on_the_spot():
    source, _, takes = _queue([10] * 6, budget=15)
    assert float(takes[4]()[0]) == 4
    assert source.submitted[0] == 4
    assert [float(takes[i]()[0]) for i in (0, 1, 2, 3, 5)] == [0, 1, 2, 3, 5]
    assert sorted(source.submitted) == list(range(6))  # each read once


def test_a_taken_tensor_is_not_kept_alive_by_the_queue():
    _, _, takes = _queue([10] * 3, budget=100)
    taken = takes[0]()
    gone = weakref.ref(taken)
    del taken
    gc.collect()
    assert gone() is None


def test_an_error_reaches_the_taker_and_the_rest_still_load():
    ahead = Lookahead(20)

    def failing():
        future: Future = Future()
        future.set_exception(OSError("read failed"))
        return future

    source = _Source()
    takes = [ahead.add(10, failing).result, ahead.add(10, source.request(1)).result,
             ahead.add(10, source.request(2)).result]
    with pytest.raises(OSError, match="read failed"):
        takes[0]()
    assert [float(takes[i]()[0]) for i in (1, 2)] == [1, 2]


def test_quantising_to_a_gpu_reads_ahead_of_the_quantizer_within_the_budget(tmp_path, monkeypatch):
    """The 5.x adapter's spawn_materialize while quantising on the fly to a device: each
    weight is a callable (stock's deferred form), the bytes come through the streamer, and
    at most QUANTISE_AHEAD_BYTES wait ahead of the one being quantised."""
    from fasthug_patch.adapters import v5
    from fasthug_patch.adapters.sources import MappedSource
    from fasthug_patch.engine import devices, ring
    from fasthug_patch.engine.materialize import Materializer, _Assembly
    from fasthug_patch.engine.to_device import DeviceStreamer
    from fasthug_patch.plan import CheckpointIndex

    monkeypatch.setattr(lookahead_module, "QUANTISE_AHEAD_BYTES", 2 << 20)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(512, 512, generator=gen).to(torch.bfloat16) for i in range(12)}  # 0.5 MiB each
    save_file(tensors, str(tmp_path / "m.safetensors"))
    refs = CheckpointIndex().tensors([str(tmp_path / "m.safetensors")])

    engine = Materializer(4, 1 << 20, None)
    backend = devices.StandInBackend(delay=0.0005)
    engine._streamers["cuda:0"] = DeviceStreamer(backend, ring.StagingRing(backend, 3, 256 << 10), engine._run,
                                                 _Assembly)

    class Call:
        materializer = engine
        quantizing = True
        quantize_lookahead = None

    call = Call()
    adapter = v5.V5Adapter(SimpleNamespace(__version__="5.24.0"), None)
    token = v5._session.set(call)
    try:
        takes = {name: adapter._spawn_materialize(None, None, (None, MappedSource(refs[name], engine), "cuda:0",
                                                               torch.bfloat16), {})
                 for name in sorted(tensors, key=lambda n: int(n[1:]))}
        assert engine._streamers["cuda:0"].tensors == 0  # nothing read before the quantizer asks
        for name, take in takes.items():
            got = take()
            assert torch.equal(got.view(torch.int16), tensors[name].view(torch.int16)), name
    finally:
        v5._session.reset(token)
        engine.close()
    assert engine._streamers["cuda:0"].tensors == 12
    assert 0.5 * (1 << 20) < call.quantize_lookahead.most_ahead <= 2.5 * (1 << 20)  # it did read ahead, within 2 MiB + 1
