"""The host-to-device pipeline's logic on every machine, with the CPU stand-in device.

The stand-in (engine/devices.StandInBackend) runs enqueued work on its own thread, in
order, optionally slowly: a slot reused before its event fired, a tensor handed over
before its copy ran, or a cast done on the wrong bytes shows up here as wrong values.
tests/test_gpu.py runs the same paths on a real GPU where there is one.
"""

from __future__ import annotations

import mmap
import pathlib
import threading

import pytest
import torch
from safetensors.torch import save_file

from fasthug_patch import device_move, settings
from fasthug_patch.engine import devices, ring
from fasthug_patch.engine.materialize import Materializer, _Assembly
from fasthug_patch.engine.to_device import DeviceStreamer, casts_on_device
from fasthug_patch.errors import CheckpointError
from fasthug_patch.plan import CheckpointIndex


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_raw(a), _raw(b))


@pytest.fixture
def standin():
    return devices.StandInBackend(delay=0.0005)


def _engine(backend, threads=4, slots=3, slot_bytes=64 << 10):
    """A Materializer whose 'cuda' devices are ``backend``, with its own small ring."""
    engine = Materializer(threads, 1 << 20, None)
    staging = ring.StagingRing(backend, slots, slot_bytes)
    engine._streamers["cuda:0"] = DeviceStreamer(backend, staging, engine._run, _Assembly)
    return engine, staging


@pytest.fixture
def checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(300, 257, generator=gen).to(torch.bfloat16),  # ~150 KiB: pieces > slots
        "odd": torch.randn(7, 13, generator=gen),  # fp32, not a multiple of anything
        "half": torch.randn(1000, generator=gen).to(torch.float16),
        "ids": torch.arange(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5),
    }
    tensors["big"].view(-1)[100] = float("nan")
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("pinning", [True, False], ids=["file-pinned", "pinning-refused"])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_checkpoint_tensors_arrive_with_stocks_bits(standin, checkpoint, dtype, pinning, monkeypatch):
    path, tensors = checkpoint
    monkeypatch.setenv("FASTHUG_PIN_FILES", "1")  # opt-in (see settings.pin_cached_files)
    standin.can_register = pinning
    refs = CheckpointIndex().tensors([str(path)])
    engine, staging = _engine(standin)
    futures = {}
    for name, ref in refs.items():
        want_dtype = dtype if dtype is not None and tensors[name].is_floating_point() else None
        futures[name] = (engine.submit(ref, want_dtype, "cuda:0"), want_dtype)
    for name, (future, want_dtype) in futures.items():
        got = future.result(timeout=30)
        want = tensors[name].to(want_dtype) if want_dtype is not None else tensors[name]
        assert _same_bits(got, want), name
    streamer = engine._streamers["cuda:0"]
    assert standin.registered == ({} if not pinning else {next(iter(standin.registered)): path.stat().st_size})
    engine.close()
    assert standin.registered == {}  # every pinned file unpinned by close()
    same_dtype = [n for n, (_, d) in futures.items() if d is None or d == tensors[n].dtype]
    nonempty_same = [n for n in same_dtype if tensors[n].numel()]
    # the file is in the page cache (just written): same-dtype tensors are DMA'd from its
    # pinned mapping; the rest (and everything when pinning is refused) through the ring
    assert streamer.tensors_direct == (len(nonempty_same) if pinning else 0)
    if not pinning:
        assert standin.operations > len(refs)  # the 3-slot ring wrapped many times


def test_a_nan_under_a_cast_is_redone_the_stock_way(standin, checkpoint):
    path, tensors = checkpoint
    refs = CheckpointIndex().tensors([str(path)])
    engine, _ = _engine(standin)
    got = engine.submit(refs["big"], torch.float16, "cuda:0").result(timeout=30)
    engine.close()
    assert _same_bits(got, tensors["big"].to(torch.float16))
    assert engine._streamers["cuda:0"].redone_for_nan == 1


def test_a_nan_under_a_cast_stock_does_on_the_device_is_left_as_the_device_cast_it(standin, checkpoint):
    """4.57 reading a shard on the GPU casts there: the device's NaN payloads are stock's,
    so nothing is redone on the CPU (the stand-in's "device" cast is torch's CPU cast)."""
    path, tensors = checkpoint
    refs = CheckpointIndex().tensors([str(path)])
    engine, _ = _engine(standin)
    got = engine.submit(refs["big"], torch.float16, "cuda:0", stock_casts_on_device=True).result(timeout=30)
    odd = engine.submit(refs["ids"], torch.float32, "cuda:0", stock_casts_on_device=True).result(timeout=30)
    engine.close()
    assert _same_bits(got, tensors["big"].to(torch.float16))
    assert _same_bits(odd, tensors["ids"].to(torch.float32))  # not a float cast: stock's steps, in stock's order
    assert engine._streamers["cuda:0"].redone_for_nan == 0


def test_slot_reuse_waits_for_the_device(checkpoint):
    """One slot and a very slow device: every read must wait for the previous copy, or the
    copy would carry the next piece's bytes."""
    path, tensors = checkpoint
    slow = devices.StandInBackend(delay=0.002)
    slow.can_register = False
    engine, staging = _engine(slow, threads=8, slots=1, slot_bytes=4096)
    ref = CheckpointIndex().tensors([str(path)])["big"]
    got = engine.submit(ref, None, "cuda:0").result(timeout=60)
    engine.close()
    assert _same_bits(got, tensors["big"])


def test_a_tensor_is_handed_over_only_after_its_device_work(checkpoint, monkeypatch):
    path, tensors = checkpoint
    monkeypatch.setenv("FASTHUG_PIN_FILES", "1")
    slow = devices.StandInBackend(delay=0.01)
    engine, _ = _engine(slow, slots=4, slot_bytes=1 << 20)  # the file is pinned: one direct DMA
    future = engine.submit(CheckpointIndex().tensors([str(path)])["odd"], None, "cuda:0")
    got = future.result(timeout=30)
    assert _same_bits(got, tensors["odd"])  # not the uninitialised destination
    engine.close()


def test_a_truncated_file_is_an_error_naming_file_and_tensor(standin, checkpoint):
    path, _ = checkpoint
    refs = CheckpointIndex().tensors([str(path)])
    with open(path, "r+b") as f:
        f.truncate(refs["big"].offset + 1000)
    standin.can_register = False  # the ring's preadv meets the short file
    engine, staging = _engine(standin)
    future = engine.submit(refs["big"], None, "cuda:0")
    with pytest.raises(CheckpointError, match="big") as caught:
        future.result(timeout=30)
    assert str(path) in str(caught.value)
    engine.close(cancel=True)
    # the ring is whole again: every slot can be taken
    taken = [staging.acquire() for _ in range(staging.slots)]
    for slot in taken:
        staging.release(slot)


def test_a_failing_device_operation_reaches_the_caller(checkpoint):
    path, _ = checkpoint

    class Broken(devices.StandInBackend):
        def copy(self, dst, src):
            raise RuntimeError("device fault")

    engine, _ = _engine(Broken())
    future = engine.submit(CheckpointIndex().tensors([str(path)])["odd"], None, "cuda:0")
    with pytest.raises(RuntimeError, match="device fault"):
        future.result(timeout=30)
    engine.close(cancel=True)


def test_casts_outside_floats_are_done_the_stock_way(standin, checkpoint):
    path, tensors = checkpoint
    assert casts_on_device(torch.float32, torch.bfloat16) and not casts_on_device(torch.int64, torch.float32)
    engine, _ = _engine(standin)
    got = engine.submit(CheckpointIndex().tensors([str(path)])["ids"], torch.float32, "cuda:0").result(timeout=30)
    engine.close()
    assert _same_bits(got, tensors["ids"].to(torch.float32))


def test_cpu_tensors_keep_shape_strides_and_bits(standin):
    engine, _ = _engine(standin)
    sources = [torch.randn(33, 65), torch.randn(4, 5, 6).to(torch.bfloat16), torch.arange(10), torch.empty(0)]
    got = [engine.submit(t, None, "cuda:0").result(timeout=30) for t in sources]
    engine.close()
    for a, b in zip(sources, got):
        assert _same_bits(a, b) and a.stride() == b.stride() and (a.numel() == 0 or a.data_ptr() != b.data_ptr())


def test_many_tensors_from_many_threads(standin, checkpoint):
    """Loads from several threads at once share one ring without mixing bytes."""
    path, tensors = checkpoint
    refs = CheckpointIndex().tensors([str(path)])
    standin.can_register = False
    staging = ring.StagingRing(standin, 2, 8192)
    errors = []

    def load():
        engine = Materializer(3, 1 << 20, None)
        engine._streamers["cuda:0"] = DeviceStreamer(standin, staging, engine._run, _Assembly)
        try:
            for name, ref in refs.items():
                if not _same_bits(engine.submit(ref, None, "cuda:0").result(timeout=60), tensors[name]):
                    errors.append(name)
        finally:
            engine.close()

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_pinning_files_is_opt_in(standin, checkpoint, monkeypatch):
    path, tensors = checkpoint
    monkeypatch.delenv("FASTHUG_PIN_FILES", raising=False)
    engine, _ = _engine(standin)
    got = engine.submit(CheckpointIndex().tensors([str(path)])["big"], None, "cuda:0").result(timeout=30)
    engine.close()
    assert _same_bits(got, tensors["big"]) and engine._streamers["cuda:0"].tensors_direct == 0
    assert not standin.registered


def test_ring_shape_setting(monkeypatch):
    monkeypatch.setenv("FASTHUG_RING", "8x64")
    assert settings.ring_shape() == (8, 64 << 20)
    monkeypatch.setenv("FASTHUG_RING", "nonsense")
    assert settings.ring_shape() == (settings.DEFAULT_RING[0], settings.DEFAULT_RING[1] << 20)
    with pytest.raises(ValueError):
        ring.StagingRing(devices.StandInBackend(), 0, 1 << 20)


# ----------------------------------------------------------------------- model.cuda()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 8, bias=False)
        self.head = torch.nn.Linear(16, 8, bias=False)
        self.head.weight = self.b.weight  # tied: one Parameter object in two modules
        self.register_buffer("steps", torch.arange(4))
        self.register_buffer("transposed", torch.randn(6, 3).t())  # not contiguous: left to torch
        self.b.weight.requires_grad_(False)


def test_a_module_streams_with_ties_flags_and_identity_kept(standin):
    model = _Tiny()
    params_before = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    values = {name: t.clone() for name, t in model.state_dict().items()}
    calls = []

    def engine_factory():
        engine, _ = _engine(standin)
        calls.append(engine)
        return engine

    fallback_moves = []

    def stock_convert(t):
        fallback_moves.append(tuple(t.shape))
        return t.clone()  # the stand-in "device" is the CPU

    assert device_move._stream(model, "cuda:0", stock_convert, engine_factory)
    assert calls and fallback_moves == [(3, 6)]  # only the non-contiguous buffer went to torch
    assert {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)} == params_before
    assert model.head.weight is model.b.weight
    assert not model.b.weight.requires_grad and model.a.weight.requires_grad
    for name, t in model.state_dict().items():
        assert _same_bits(t, values[name]), name


def test_a_failed_stream_changes_nothing(standin):
    model = _Tiny()
    before = {name: t.data_ptr() for name, t in model.state_dict().items()}

    class Broken(devices.StandInBackend):
        def copy(self, dst, src):
            raise RuntimeError("device fault")

    def engine_factory():
        return _engine(Broken())[0]

    assert not device_move._stream(model, "cuda:0", lambda t: t, engine_factory)
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == before


def test_only_fast_loaded_models_stream():
    model = _Tiny()
    assert not device_move.was_fast_loaded(model)
    device_move.note_fast_loaded((model, {"missing_keys": []}))  # output_loading_info=True shape
    assert device_move.was_fast_loaded(model)
    assert device_move._to_target(("cpu",), {}) is None
    assert device_move._to_target(("cuda", torch.float16), {}) is None  # a dtype: torch's own move


def test_a_move_under_a_torch_mode_is_left_to_torch():
    """torch's own move runs its copies under the caller's function or dispatch mode, the
    ring's threads would not; a default device is no such mode."""
    from torch.overrides import TorchFunctionMode

    model = _Tiny()
    device_move.note_fast_loaded(model)
    assert device_move._eligible(model)
    with TorchFunctionMode():
        assert not device_move._eligible(model)
    with torch.device("cpu"):
        assert device_move._eligible(model)


class _Refusing(devices.StandInBackend):
    """Pins every chunk but the ``refuse``-th it is asked to."""

    def __init__(self, refuse: int) -> None:
        super().__init__(delay=0.0002)
        self.refuse, self.asked = refuse, 0

    def register(self, address, nbytes):
        with self._lock:
            self.asked += 1
            if self.asked == self.refuse:
                return False
        return super().register(address, nbytes)


@pytest.mark.parametrize("refuse", [0, 2], ids=["all-pinned", "a-chunk-refused"])
def test_a_file_is_pinned_in_page_sized_chunks_and_copied_chunk_by_chunk(checkpoint, monkeypatch, refuse):
    """Chunks of one page: "big" straddles dozens of them. Every copy from the pinned file
    must lie inside one registration (the stand-in fails it otherwise), and a refused chunk
    sends the tensors that lie in it through the ring, with the same bits."""
    path, tensors = checkpoint
    monkeypatch.setenv("FASTHUG_PIN_FILES", "1")
    backend = _Refusing(refuse)
    engine = Materializer(4, 1 << 20, None)
    engine._streamers["cuda:0"] = streamer = DeviceStreamer(backend, ring.StagingRing(backend, 3, 64 << 10),
                                                            engine._run, _Assembly, pin_chunk_bytes=1)
    refs = CheckpointIndex().tensors([str(path)])
    futures = {name: engine.submit(ref, None, "cuda:0") for name, ref in refs.items()}
    for name, future in futures.items():
        assert _same_bits(future.result(timeout=30), tensors[name]), name
    size = path.stat().st_size
    page = streamer.pin_file(str(path)).chunk_bytes
    assert page == mmap.PAGESIZE
    chunks = -(-size // page)
    assert backend.asked == chunks
    assert sum(backend.registered.values()) == size - (0 if not refuse else page)
    assert all(address % page == 0 for address in backend.registered)
    nonempty = [n for n in tensors if tensors[n].numel()]
    if not refuse:
        assert streamer.tensors_direct == len(nonempty)
    else:
        assert streamer.tensors_direct < len(nonempty)  # those in the refused chunk, and after it
    engine.close()
    assert backend.registered == {}


def test_pinning_ahead_registers_each_warm_file_once(standin, checkpoint, monkeypatch):
    """pin_ahead starts the pinning while the model is built; the loader's later requests,
    whatever the device is called, use that pinning instead of registering again."""
    path, tensors = checkpoint
    monkeypatch.setenv("FASTHUG_PIN_FILES", "1")
    engine = Materializer(4, 1 << 20, None)
    engine.backend_for = lambda device: standin
    engine.prepare([str(path)])
    assert engine.pin_ahead("cuda:0") == 1
    refs = CheckpointIndex().tensors([str(path)])
    got = engine.submit(refs["big"], None, 0).result(timeout=30)  # the device spelt another way
    assert _same_bits(got, tensors["big"])
    assert engine._streamer(0) is engine._streamer("cuda:0")
    assert len(standin.registered) == 1 and engine._streamers["cuda:0"].tensors_direct == 1
    engine.close()
    assert standin.registered == {}


def test_pinning_ahead_is_opt_in_and_skips_cold_files(standin, checkpoint, monkeypatch):
    path, _ = checkpoint
    engine = Materializer(4, 1 << 20, None)
    engine.backend_for = lambda device: standin
    engine.prepare([str(path)])
    monkeypatch.delenv("FASTHUG_PIN_FILES", raising=False)
    assert engine.pin_ahead("cuda:0") == 0
    monkeypatch.setenv("FASTHUG_PIN_FILES", "1")
    engine._cold.add(str(path))
    assert engine.pin_ahead("cuda:0") == 0
    engine.close()
    assert not standin.registered


_EXIT_DURING_WARMUP = """
import sys, time
import torch  # as in any process that loads: imported in the warm-up thread at exit, it fails on 3.12+
from fasthug_patch.engine import devices, ring

class SlowToPin(devices.StandInBackend):
    def host_buffer(self, nbytes):
        time.sleep(0.5)  # a slow cudaHostAlloc
        buffer = super().host_buffer(nbytes)
        open(sys.argv[1], "w").write("ring pinned")
        return buffer

devices.backend_for = lambda device: SlowToPin(name=device)
ring.warm_async(["cuda:0"])
# the script ends at once: a load that warmed the ring and then fell back to stock
"""


def test_the_process_exits_only_after_a_ring_warm_up_ends(tmp_path):
    """A ring warm-up still inside its (CUDA) allocation when the interpreter exits must
    not be cut off there: a daemon thread stopped on its way back from a pybind11 call
    aborts the process. The exit waits for it instead."""
    import subprocess
    import sys

    marker = tmp_path / "pinned"
    script = tmp_path / "exit_during_warmup.py"
    script.write_text(_EXIT_DURING_WARMUP)
    done = subprocess.run([sys.executable, str(script), str(marker)], capture_output=True, text=True, timeout=60,
                          cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "ring pinned"


@pytest.mark.parametrize("device_map, names", [
    ("cuda", {"cuda:1"}), ("cuda:0", {"cuda:0"}), (0, {"cuda:0"}), (torch.device("cuda"), {"cuda:1"}),
    ("auto", {"cuda:1"}), ("cpu", set()), (None, set()), (True, set()),
    ({"model": 0, "lm_head": "cpu", "norm": "cuda:2", "x": "disk"}, {"cuda:0", "cuda:2"}),
])
def test_the_devices_a_ring_is_warmed_for(device_map, names, monkeypatch):
    """Every spelling of a CUDA device in a device map names one ring, indexed ("cuda" and
    "auto" are the current device, 1 here); CPU and disk entries name none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert ring.cuda_devices(device_map) == names


def test_a_move_in_inference_mode_hands_over_what_torch_makes_there(standin):
    """model.to(device) inside torch.inference_mode() makes its copies on this thread, as
    inference tensors; the ring's copies, made by its threads, are handed over the same way.
    (The engine and its ring are made before the mode: a process's ring is made on first
    use, inside an engine entry point or a reader thread, never in the caller's mode.)"""
    torch.manual_seed(0)
    streamed = _Tiny()
    torch.manual_seed(0)
    moved = _Tiny()
    engine, _ = _engine(standin)
    with torch.inference_mode():
        assert device_move._stream(streamed, "cuda:0", lambda t: t.clone(), lambda: engine)
        with torch.no_grad():
            moved._apply(lambda t: t.clone())  # torch's own move, the stand-in device being the CPU
    kinds = {}
    for (name, a), (_, b) in zip(streamed.state_dict().items(), moved.state_dict().items()):
        assert a.is_inference() == b.is_inference(), name
        assert _same_bits(a, b), name
        kinds[name] = a.is_inference()
    assert any(kinds.values()), kinds
