"""Faults during a load, end to end through from_pretrained.

A checkpoint file truncated, replaced or deleted while the load is under way must end in
an error that names the file (or, where the file is still good, the stock model), never a
SIGBUS and never a model built from the wrong bytes. An exception in a reader thread must
cancel the rest of the load cleanly: stock's model, no reader thread left, no descriptor
leaked. Faults are injected at the right moment by wrapping one function of plan.py or of
the engine (tests only wrap; the engine's code is not changed).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import fasthug_patch
import fasthug_patch.engine.materialize as materialize
import fasthug_patch.plan as plan
from tests.architectures import LEGACY_STATE_DICT_LOAD
from tests.parity import assert_same_model, load_model
from tests.tiny import (
    DTYPE_KWARG,
    assert_exited_normally,
    json_lines,
    run_python,
)

AUTO = "AutoModelForCausalLM"
SHARD2 = "model-00002-of-00003.safetensors"
# Zero-copy views of the mapping need the checkpoint's own dtype,
# which 4.57 only keeps when asked; a float32 load of the bf16 checkpoint casts every tensor.
PATHS = {"mapped": {DTYPE_KWARG: torch.bfloat16}, "cast": {DTYPE_KWARG: torch.float32}}


# --------------------------------------------------------------------------- truncation, in a child
# A truncated mapping can raise SIGBUS, which would kill pytest: these run in a child that
# wraps one function so the file shrinks at the chosen moment, then loads with the patch
# and, for reference, with stock (on the file as it now is).

TRUNCATING_CHILD = """
import json, os, sys
import torch
import fasthug_patch
import fasthug_patch.engine.materialize as materialize
import fasthug_patch.plan as plan
from transformers import AutoModelForCausalLM
from tests.tiny import DTYPE_KWARG

directory, victim, moment, dtype = sys.argv[1:5]
kwargs = {DTYPE_KWARG: getattr(torch, dtype)}
victim = os.path.realpath(os.path.join(directory, victim))
state = {"done": False}

def shrink(size):
    if not state["done"]:
        state["done"] = True
        os.truncate(victim, size)
        print(json.dumps({"truncated": victim}), flush=True)

if moment == "after-header":  # the header index is read, nothing mapped yet: cut it in half
    real_read = plan.read_safetensors_header
    def read(path):
        header = real_read(path)
        if os.path.realpath(path) == victim:
            shrink((os.path.getsize(victim) + 8) // 2)
        return header
    plan.read_safetensors_header = read
elif moment == "in-reader-thread":  # a reader thread is about to prefault or cast a chunk of
    # a tensor of the victim: cut the file at the page where that tensor begins
    real_run = materialize.Materializer._run
    def run(self, assembly, fn, *args, **options):
        def truncating(*fn_args):
            ref = next((a for a in fn_args if isinstance(a, plan.TensorRef)), None)
            if ref is not None and os.path.realpath(ref.file) == victim and ref.nbytes:
                shrink(ref.offset - ref.offset % 4096)
            return fn(*fn_args)
        return real_run(self, assembly, truncating, *args, **options)
    materialize.Materializer._run = run
elif moment == "after-mapping":  # a zero-copy view of a tensor of the victim was handed out
    real_submit = materialize.Materializer.submit
    def submit(self, source, *args, **kwargs):
        future = real_submit(self, source, *args, **kwargs)
        if isinstance(source, plan.TensorRef) and os.path.realpath(source.file) == victim and source.nbytes:
            future.result()
            shrink(source.offset - source.offset % 4096)
        return future
    materialize.Materializer.submit = submit

def attempt(scope):
    try:
        with scope():
            AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except Exception as exc:
        chain, seen = [], exc
        while seen is not None:
            chain.append(f"{type(seen).__name__}: {seen}")
            seen = seen.__cause__ or seen.__context__
        return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "chain": chain}
    return {"type": None, "chain": []}

fast = attempt(fasthug_patch.enabled)
report = fasthug_patch.last_report()
stock = attempt(fasthug_patch.disabled)
print(json.dumps({"fast": fast, "stock": stock, "path": report.path, "reason": report.reason,
                  "truncated": state["done"]}), flush=True)
"""


def _truncate_during_load(directory: str, victim: str, moment: str, dtype: str, env: dict | None = None) -> dict:
    proc = run_python(TRUNCATING_CHILD, args=[directory, victim, moment, dtype], env=env, timeout=240)
    assert_exited_normally(proc)  # the point: never a SIGBUS
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json_lines(proc.stdout)[-1]
    assert result["truncated"], "the fault was never injected"
    return {**result, "stderr": proc.stderr}


def _assert_error_names_file(result: dict, victim: str) -> None:
    fast, stock = result["fast"], result["stock"]
    assert stock["type"] is not None, "stock loaded the truncated checkpoint?"
    assert fast["type"] == stock["type"], (fast, stock)  # stock's own error for that file...
    # ...and the file is named: in the chained fast-path error and the warning, if not in
    # stock's own message.
    assert any(victim in link for link in fast["chain"]) or victim in result["stderr"], fast
    assert result["path"] == "fallback" and victim in result["reason"], result


@pytest.mark.parametrize(
    "kind, victim, dtype, io",
    [
        ("single", "model.safetensors", "bfloat16", None),
        ("sharded", SHARD2, "float32", None),
        ("sharded", SHARD2, "bfloat16", "read"),  # files read ahead with preadv first
    ],
    ids=["single-mapped", "sharded-cast", "sharded-mapped-read-ahead"],
)
def test_truncated_after_the_header_index_is_read(derive, kind, victim, dtype, io):
    path = derive(kind, "truncated")
    result = _truncate_during_load(path, victim, "after-header", dtype, env={"FASTHUG_IO": io} if io else None)
    _assert_error_names_file(result, os.path.realpath(os.path.join(path, victim)))


def test_truncated_while_zero_copy_views_are_prefaulted(derive):
    """Reader threads prefault the mapped bytes with MADV_POPULATE_READ: a shrunk file
    comes back as EFAULT, an error naming the file."""
    path = derive("sharded", "truncated")
    result = _truncate_during_load(path, SHARD2, "in-reader-thread", "bfloat16", env={"FASTHUG_POPULATE": "1"})
    _assert_error_names_file(result, os.path.realpath(os.path.join(path, SHARD2)))


@pytest.mark.parametrize("populate", [None, "1"], ids=["default", "prefaulted"])
def test_truncated_under_a_zero_copy_view_already_handed_out(derive, populate):
    """The file shrinks under a view stock already holds: the load must notice (a later
    tensor past the end, or the file's changed size at the end of the load) and fall back,
    without touching the vanished pages."""
    path = derive("sharded", "truncated")
    env = {"FASTHUG_POPULATE": populate} if populate else None
    result = _truncate_during_load(path, SHARD2, "after-mapping", "bfloat16", env=env)
    _assert_error_names_file(result, os.path.realpath(os.path.join(path, SHARD2)))


def test_truncated_under_views_a_weight_conversion_reads(tmp_path):
    """5.x fuses a MoE model's experts at load (a WeightConverter's torch.cat over the
    zero-copy views, long after they were handed out): the views are checked before it
    reads them, so a shrunk file is an error naming it, not a SIGBUS in stock's code.
    On 4.x there is no conversion, and the end-of-load check catches it."""
    from tests import architectures
    from tests.parity import build_checkpoint

    path = str(build_checkpoint(architectures.get("mixtral"), tmp_path / "moe", dtype=torch.bfloat16))
    result = _truncate_during_load(path, "model.safetensors", "after-mapping", "bfloat16")
    _assert_error_names_file(result, os.path.realpath(os.path.join(path, "model.safetensors")))


@pytest.mark.skipif(LEGACY_STATE_DICT_LOAD, reason="before 4.51 stock casts the views itself: "
                    "test_truncated_after_a_cast_was_handed_out covers that line")
def test_truncated_while_a_reader_thread_casts(derive):
    # Each cast chunk is prefaulted with MADV_POPULATE_READ before copy_, so the shrink
    # comes back as an error naming the file instead of a SIGBUS in a reader thread.
    path = derive("single", "truncated")
    result = _truncate_during_load(path, "model.safetensors", "in-reader-thread", "float32")
    _assert_error_names_file(result, os.path.realpath(os.path.join(path, "model.safetensors")))


def test_truncated_after_a_cast_was_handed_out(derive):
    """The file shrinks once a cast tensor of it is done (4.51+: the engine's cast, read from
    the mapping; before: a view stock is about to cast): the rest of the load must not read
    the vanished pages, and the load ends in stock's error, the file named."""
    path = derive("single", "truncated")
    result = _truncate_during_load(path, "model.safetensors", "after-mapping", "float32")
    _assert_error_names_file(result, os.path.realpath(os.path.join(path, "model.safetensors")))


# --------------------------------------------------------------------------- replaced or deleted


def _replace_with_shifted_layout(path: str) -> None:
    """Same tensors, same values, but a longer header: every byte offset moves."""
    state = load_file(path)
    save_file(state, path + ".new", metadata={"format": "pt", "padding": "x" * 1000})
    os.replace(path + ".new", path)


def _replace_with_new_values(path: str) -> None:
    """Same layout, other values (a re-download of a newer revision, say)."""
    state = load_file(path)
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, path + ".new",
              metadata={"format": "pt"})
    os.replace(path + ".new", path)


CHANGES = {"shifted-layout": _replace_with_shifted_layout, "new-values": _replace_with_new_values, "deleted": os.remove}


@pytest.mark.parametrize("moment", ["after-header", "after-mapping"])
@pytest.mark.parametrize("path_kind", sorted(PATHS))
@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("kind, victim", [("single", "model.safetensors"), ("sharded", SHARD2)])
def test_file_changed_during_the_load(derive, monkeypatch, kind, victim, change, path_kind, moment):
    """The engine maps files by path after plan.py read their headers: a file replaced in
    between must not be read with the old header's offsets (a wrong model, silently). One
    replaced after it was mapped is read consistently, but the load is redone by stock all
    the same, so the result is the file as it now is, as it is for one replaced before."""
    path = derive(kind, "changed")
    target = os.path.realpath(os.path.join(path, victim))
    changed = []

    def change_once():
        if not changed:
            changed.append(target)
            CHANGES[change](target)

    if moment == "after-header":
        real_read = plan.read_safetensors_header

        def read(file):
            header = real_read(file)
            if os.path.realpath(file) == target:
                change_once()
            return header

        monkeypatch.setattr(plan, "read_safetensors_header", read)
    else:
        real_submit = materialize.Materializer.submit

        def submit(self, source, *args, **kwargs):
            future = real_submit(self, source, *args, **kwargs)
            if isinstance(source, plan.TensorRef) and os.path.realpath(source.file) == target:
                future.result()
                change_once()
            return future

        monkeypatch.setattr(materialize.Materializer, "submit", submit)
    with fasthug_patch.enabled():
        try:
            fast, error = load_model(AUTO, path, **PATHS[path_kind])[0], None
        except Exception as exc:  # noqa: BLE001
            fast, error = None, exc
        report = fasthug_patch.last_report()
    monkeypatch.undo()
    assert changed
    assert report.path == "fallback" and target in report.reason, report.reason
    with fasthug_patch.disabled():  # stock, on the checkpoint as it is now
        try:
            stock, stock_error = load_model(AUTO, path, **PATHS[path_kind])[0], None
        except Exception as exc:  # noqa: BLE001
            stock, stock_error = None, exc
    if stock_error is not None:
        assert type(error) is type(stock_error) and str(error) == str(stock_error)
        assert fast is None
    else:
        assert error is None, error
        assert_same_model(stock, fast)


# --------------------------------------------------------------------------- reader-thread errors


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


ENGINE_THREADS = ("fasthug-reader", "fasthug-cast")  # the engine's two pools


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(ENGINE_THREADS)]


def _settle(baseline_threads: set, timeout: float = 10.0) -> set:
    """Threads alive now that were not before, once finished threads had time to exit
    (tqdm's monitor, which stock's progress bars start once per process, is not ours)."""
    deadline = time.monotonic() + timeout
    while True:
        extra = {t for t in threading.enumerate()
                 if t.ident not in baseline_threads and type(t).__name__ != "TMonitor"}
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


def _fail_in_reader_thread(monkeypatch, n: int) -> dict:
    """The n-th chunk job a reader thread runs raises OSError; returns the call counter."""
    real_run = materialize.Materializer._run
    calls = {"n": 0, "threads": set()}
    lock = threading.Lock()

    def run(self, assembly, fn, *args, **options):
        def failing(*fn_args):
            with lock:
                calls["n"] += 1
                calls["threads"].add(threading.current_thread().name)
                hit = calls["n"] == n
            if hit:
                raise OSError(5, "simulated read failure in a reader thread")
            return fn(*fn_args)

        return real_run(self, assembly, failing, *args, **options)

    monkeypatch.setattr(materialize.Materializer, "_run", run)
    return calls


@pytest.mark.parametrize("io", ["auto", "read"])
@pytest.mark.parametrize("path_kind", sorted(PATHS))
def test_reader_thread_error_cancels_the_load_cleanly(good, monkeypatch, path_kind, io):
    monkeypatch.setenv("FASTHUG_THREADS", "4")
    monkeypatch.setenv("FASTHUG_POPULATE", "1")  # zero-copy views too are made by reader threads
    monkeypatch.setenv("FASTHUG_IO", io)  # "read": files are first read ahead with preadv
    kwargs = PATHS[path_kind]
    with fasthug_patch.disabled():
        stock = load_model(AUTO, good["sharded"], **kwargs)[0]
    with fasthug_patch.enabled():  # warm up: lazy imports, pools, caches
        load_model(AUTO, good["sharded"], **kwargs)
    fds, threads = _fd_count(), {t.ident for t in threading.enumerate()}

    calls = _fail_in_reader_thread(monkeypatch, 3)
    with fasthug_patch.enabled():
        fast = load_model(AUTO, good["sharded"], **kwargs)[0]
        report = fasthug_patch.last_report()
    monkeypatch.undo()

    assert calls["n"] >= 3, "the fault was never injected"
    assert all(name.startswith(ENGINE_THREADS) for name in calls["threads"]), calls["threads"]
    assert report.path == "fallback" and "simulated read failure" in report.reason, report.reason
    assert_same_model(stock, fast)
    assert not _reader_threads(), "reader threads left behind"
    assert not _settle(threads), "threads left behind"
    assert _fd_count() == fds, "file descriptors leaked"


def test_read_ahead_error_falls_back_cleanly(good, monkeypatch):
    """An I/O error while a file is read ahead (FASTHUG_IO=read): stock's model, nothing left over."""
    monkeypatch.setenv("FASTHUG_IO", "read")
    with fasthug_patch.disabled():
        stock = load_model(AUTO, good["sharded"])[0]
    with fasthug_patch.enabled():
        load_model(AUTO, good["sharded"])
    fds, threads = _fd_count(), {t.ident for t in threading.enumerate()}
    real_preadv, calls = os.preadv, {"n": 0}

    def preadv(fd, buffers, offset, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", preadv)
    with fasthug_patch.enabled():
        fast = load_model(AUTO, good["sharded"])[0]
        report = fasthug_patch.last_report()
    monkeypatch.undo()
    assert calls["n"] >= 2, "the fault was never injected (files not read ahead?)"
    assert report.path == "fallback" and "Input/output error" in report.reason, report.reason
    assert_same_model(stock, fast)
    assert not _reader_threads() and not _settle(threads)
    assert _fd_count() == fds, "file descriptors leaked"


def test_fast_loads_leave_no_threads_or_descriptors(good, monkeypatch):
    with fasthug_patch.enabled():
        load_model(AUTO, good["sharded"])
    fds, threads = _fd_count(), {t.ident for t in threading.enumerate()}
    with fasthug_patch.enabled():
        for io in ("auto", "read"):
            monkeypatch.setenv("FASTHUG_IO", io)
            for kind in ("single", "sharded"):
                for kwargs in PATHS.values():
                    load_model(AUTO, good[kind], **kwargs)
    assert not _reader_threads() and not _settle(threads)
    assert _fd_count() == fds


def test_error_submitting_a_tensor_falls_back(good, monkeypatch):
    """An error raised in the loading thread itself, half-way through the tensors."""
    real_submit = materialize.Materializer.submit
    calls = {"n": 0}

    def submit(self, source, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(5, "simulated failure while submitting")
        return real_submit(self, source, *args, **kwargs)

    fds, threads = _fd_count(), {t.ident for t in threading.enumerate()}
    monkeypatch.setattr(materialize.Materializer, "submit", submit)
    with fasthug_patch.enabled():
        fast = load_model(AUTO, good["sharded"])[0]
        report = fasthug_patch.last_report()
    monkeypatch.undo()
    with fasthug_patch.disabled():
        stock = load_model(AUTO, good["sharded"])[0]
    assert calls["n"] >= 5
    assert report.path == "fallback" and "simulated failure" in report.reason
    assert_same_model(stock, fast)
    assert not _reader_threads() and not _settle(threads)
    assert _fd_count() == fds


# --------------------------------------------------------------------------- low memory


@pytest.mark.parametrize("path_kind", sorted(PATHS))
@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_checkpoint_larger_than_free_memory_streams_with_a_warning(good, monkeypatch, kind, path_kind):
    """With less memory free than the checkpoint's files (simulated), nothing is prefetched
    or prefaulted: weights are read on first use as stock reads them, and the user is told."""
    path = good[kind]
    kwargs = PATHS[path_kind]
    with fasthug_patch.disabled():
        stock, _ = load_model(AUTO, path, **kwargs)
    monkeypatch.setenv("FASTHUG_MEMORY_AVAILABLE_MB", "0")
    with fasthug_patch.enabled(), pytest.warns(UserWarning, match="exceed the memory available"):
        fast, _ = load_model(AUTO, path, **kwargs)
    report = fasthug_patch.last_report()
    assert report.path == "fast"
    assert any("first use" in how for how in report.io.values()), report.io
    assert any("exceed the memory available" in note for note in report.notes)
    assert_same_model(stock, fast, context=f"{kind}/{path_kind} low memory")
