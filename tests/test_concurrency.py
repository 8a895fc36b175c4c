"""Concurrency: several threads loading through the patch, switches flipped in other
threads mid-load, forked DataLoader workers reading the loaded weights, two processes
loading one checkpoint at once. Every model equals stock's (tests/parity.py), and every
wait has a timeout, so a deadlock fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import fasthug_patch
import fasthug_patch.entry as entry
import fasthug_patch.engine.materialize as materialize
from fasthug_patch import activation
from tests.parity import assert_same_model, load_model
from tests.tiny import DTYPE_KWARG, json_lines, model_digest, python_env, save_tiny_llama

AUTO = "AutoModelForCausalLM"
JOIN_TIMEOUT = 120

# name -> (how the checkpoint is saved, how it is loaded)
MODELS = {
    "bf16-single": (dict(seed=1), {}),
    "fp32-sharded": (dict(seed=2, dtype=torch.float32, max_shard_size="20KB"), {}),
    "bf16-cast-to-fp32": (dict(seed=3, max_shard_size="20KB"), {DTYPE_KWARG: torch.float32}),
    "bf16-kept": (dict(seed=4), {DTYPE_KWARG: torch.bfloat16}),
    "fp16-bin": (dict(seed=5, dtype=torch.float16, bin_format=True), {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    return {name: save_tiny_llama(str(root / name), **save) for name, (save, _) in MODELS.items()}


@pytest.fixture(scope="module")
def stock_models(checkpoints):
    with fasthug_patch.disabled():
        return {name: load_model(AUTO, checkpoints[name], **MODELS[name][1])[0] for name in MODELS}


@pytest.fixture()
def reports(monkeypatch):
    """(thread name, report path, source) of every load the patch routed, by any thread."""
    seen: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    real = entry.publish

    def publish(report):
        with lock:
            seen.append((threading.current_thread().name, report.path, report.source))
        real(report)

    monkeypatch.setattr(entry, "publish", publish)
    return seen


@pytest.fixture()
def restore_switch():
    """Put the process-wide switch back as it was (the tests flip it)."""
    was_on = activation._switch_on
    yield
    (fasthug_patch.enable if was_on else fasthug_patch.disable)()


def _run_threads(targets: dict, timeout: float = JOIN_TIMEOUT) -> dict:
    """Run name -> callable in threads started together; name -> result. Fails on any
    exception, and on any thread still running after ``timeout`` (a deadlock)."""
    barrier = threading.Barrier(len(targets))
    results, errors = {}, {}

    def body(name, fn):
        try:
            barrier.wait(timeout=30)
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc

    threads = [threading.Thread(target=body, args=item, name=item[0], daemon=True) for item in targets.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still running after {timeout}s (deadlock?): {stuck}"
    assert not errors, f"threads raised: {errors!r}"
    return results


def test_threads_loading_different_models_at_once(checkpoints, stock_models, reports):
    def loads(name):
        def run():
            with fasthug_patch.enabled():
                return [load_model(AUTO, checkpoints[name], **MODELS[name][1])[0] for _ in range(3)]

        return run

    results = _run_threads({name: loads(name) for name in MODELS})
    for name, models in results.items():
        for model in models:
            assert_same_model(stock_models[name], model, context=name)
    paths = {(thread, path) for thread, path, _ in reports}
    assert paths == {(name, "fast") for name in MODELS}, sorted(paths)


def test_switches_flipped_in_other_threads_during_loads(checkpoints, stock_models, reports, restore_switch):
    """Loaders under enabled(), under disabled() and under the process-wide switch, while
    other threads flip enable()/disable() and open enabled()/disabled() scopes. Each scope
    holds for its own thread only; each load is decided when it starts; all are right."""
    names = ["bf16-cast-to-fp32", "fp32-sharded", "bf16-kept"]
    stop = threading.Event()
    flips = {"switch": 0, "scopes": 0}
    toggler_errors = []

    def loader(scope):
        def run():
            models = []
            for i in range(6):
                name = names[i % len(names)]
                with scope():
                    models.append((name, load_model(AUTO, checkpoints[name], **MODELS[name][1])[0]))
            return models

        return run

    def flip_switch():
        while not stop.is_set():
            fasthug_patch.disable()
            fasthug_patch.enable()
            flips["switch"] += 1
            time.sleep(0.001)

    def flip_scopes():
        while not stop.is_set():
            with fasthug_patch.enabled():
                assert fasthug_patch.is_enabled()
                with fasthug_patch.disabled():
                    assert not fasthug_patch.is_enabled()
            flips["scopes"] += 1
            time.sleep(0.001)

    def recording(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - asserted below
                toggler_errors.append(exc)

        return run

    togglers = [threading.Thread(target=recording(f), name=f.__name__, daemon=True) for f in (flip_switch, flip_scopes)]
    # An enabled() scope open in this thread keeps the wrappers installed, so every load goes
    # through the patch's lock: stock from_pretrained is not thread-safe by itself (it swaps
    # process-wide state such as torch's default dtype), and that is not what is tested here.
    with fasthug_patch.enabled():
        for t in togglers:
            t.start()
        try:
            results = _run_threads({
                "in-enabled": loader(fasthug_patch.enabled),
                "in-disabled": loader(fasthug_patch.disabled),
                "on-switch": loader(contextlib.nullcontext),
            })
        finally:
            stop.set()
            for t in togglers:
                t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in togglers) and not toggler_errors, toggler_errors
    assert flips["switch"] > 0 and flips["scopes"] > 0
    for thread, models in results.items():
        for name, model in models:
            assert_same_model(stock_models[name], model, context=f"{thread}: {name}")
    by_thread = {}
    for thread, path, _ in reports:
        by_thread.setdefault(thread, []).append(path)
    assert by_thread.get("in-enabled") == ["fast"] * 6, by_thread
    assert "in-disabled" not in by_thread, by_thread  # its own disabled() scope wins
    assert set(by_thread.get("on-switch", [])) <= {"fast"}, by_thread

    fasthug_patch.enable()
    assert activation.installed_patch() is not None


@pytest.mark.parametrize("then_enable", [False, True], ids=["disable", "disable-then-enable"])
@pytest.mark.parametrize("name", ["fp32-sharded", "bf16-cast-to-fp32"])
def test_patch_removed_by_another_thread_mid_load(checkpoints, stock_models, monkeypatch, restore_switch,
                                                   name, then_enable):
    """A load that began on the fast path finishes correctly when another thread disables
    the patch half-way (its wrappers are removed: transformers' originals are back), and
    when that thread then re-enables it (new wrappers) before the load ends."""
    fasthug_patch.enable()
    assert activation._open_enabled_scopes == 0
    requests, done = [], threading.Event()
    ready = threading.Condition()

    def toggler():
        while not done.is_set():
            with ready:
                ready.wait_for(lambda: requests or done.is_set(), timeout=1)
                if requests:
                    action, finished = requests.pop(0)
                    action()
                    finished.set()

    def ask(action):  # have the toggler thread do it, and wait until it is done
        finished = threading.Event()
        with ready:
            requests.append((action, finished))
            ready.notify()
        assert finished.wait(30), "toggler did not answer"

    real_submit = materialize.Materializer.submit
    submits = {"n": 0}

    def submit(self, *args, **kwargs):  # called by the loading thread, once per tensor
        submits["n"] += 1
        if submits["n"] == 1:
            ask(fasthug_patch.disable)
            assert activation.installed_patch() is None
            if then_enable:  # new wrappers, from a new adapter, for the rest of this load
                ask(fasthug_patch.enable)
                assert activation.installed_patch() is not None
        return real_submit(self, *args, **kwargs)

    monkeypatch.setattr(materialize.Materializer, "submit", submit)
    thread = threading.Thread(target=toggler, name="toggler", daemon=True)
    thread.start()
    try:
        model = _run_threads({"loader": lambda: load_model(AUTO, checkpoints[name], **MODELS[name][1])[0]})["loader"]
    finally:
        done.set()
        with ready:
            ready.notify_all()
        thread.join(JOIN_TIMEOUT)
    assert submits["n"] >= 1
    assert_same_model(stock_models[name], model, context=name)


# --------------------------------------------------------------------------- processes

DATALOADER_CHILD = """
import hashlib, json, os, sys
import torch
from torch.utils.data import DataLoader, Dataset
import fasthug_patch
from transformers import AutoModelForCausalLM
from tests.tiny import DTYPE_KWARG

path = sys.argv[1]
LOADS = {"mapped": {DTYPE_KWARG: torch.bfloat16}, "cast": {DTYPE_KWARG: torch.float32}}
TOKENS = torch.arange(12).view(1, 12)

def digest(t):
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

class Weights(Dataset):
    # Items are the digests of the model's weights, and of a forward pass, computed in the
    # worker process that fetches them.
    def __init__(self, model):
        self.model, self.names = model, sorted(model.state_dict())
    def __len__(self):
        return len(self.names) + 1
    def __getitem__(self, i):
        if i == len(self.names):
            with torch.no_grad():
                return "forward", digest(self.model(TOKENS).logits), os.getpid()
        return self.names[i], digest(self.model.state_dict()[self.names[i]]), os.getpid()

def expected(model):
    out = {name: digest(t) for name, t in model.state_dict().items()}
    with torch.no_grad():
        out["forward"] = digest(model(TOKENS).logits)
    return out

result = {}
for kind, kwargs in LOADS.items():
    with fasthug_patch.disabled():
        want = expected(AutoModelForCausalLM.from_pretrained(path, **kwargs))
    with fasthug_patch.enabled():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        report = fasthug_patch.last_report()
    loader = DataLoader(Weights(model), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60)
    got, pids = {}, set()
    for name, value, pid in loader:
        got[name], pids = value, pids | {pid}
    result[kind] = {"path": report.path, "same": got == want, "items": len(got),
                    "pids": sorted(pids), "parent": os.getpid()}
print(json.dumps(result), flush=True)
"""


def test_dataloader_fork_workers_read_weights_after_a_patched_load(checkpoints):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DATALOADER_CHILD), checkpoints["bf16-single"]],
        env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json_lines(proc.stdout)[-1]
    for kind, got in result.items():
        assert got["path"] == "fast", (kind, got)
        assert got["same"] and got["items"] > 10, (kind, got)
        assert got["parent"] not in got["pids"] and len(got["pids"]) == 2, (kind, got)


TWO_PROCESS_CHILD = """
import json, os, sys, time
import torch
import fasthug_patch
from transformers import AutoModelForCausalLM
from tests.tiny import DTYPE_KWARG, model_digest

path, barrier_dir, me, peers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
LOADS = {"mapped": {DTYPE_KWARG: torch.bfloat16}, "cast": {DTYPE_KWARG: torch.float32}}
open(os.path.join(barrier_dir, me), "w").close()
deadline = time.monotonic() + 120
while len(os.listdir(barrier_dir)) < peers:  # start loading together
    assert time.monotonic() < deadline, "peer never started"
    time.sleep(0.01)
out = []
with fasthug_patch.enabled():
    for _ in range(5):
        for kind, kwargs in LOADS.items():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            out.append([kind, model_digest(model), fasthug_patch.last_report().path])
print(json.dumps({"loads": out}), flush=True)
"""


def test_two_processes_load_the_same_checkpoint_at_once(checkpoints, tmp_path):
    path = checkpoints["bf16-cast-to-fp32"]
    want = {}
    with fasthug_patch.disabled():
        for kind, dtype in (("mapped", torch.bfloat16), ("cast", torch.float32)):
            want[kind] = model_digest(load_model(AUTO, path, **{DTYPE_KWARG: dtype})[0])
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(TWO_PROCESS_CHILD), path, str(barrier), f"p{i}", "2"],
            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=300)
            assert child.returncode == 0, stderr[-4000:]
            outputs.append(json_lines(stdout)[-1]["loads"])
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for loads in outputs:
        assert len(loads) == 10
        for kind, digest, path_taken in loads:
            assert path_taken == "fast" and digest == want[kind], (kind, path_taken)
