"""The from_pretrained wrapper: decide, load, fall back to stock on any surprise, report.

The fast path never changes what stock transformers decides (model class, config, dtype,
device map, missing keys, tying): stock from_pretrained runs as usual and only its weight
materialisation internals are replaced by the adapter. If anything raises after those
internals were entered, the whole call is redone by stock with the patch off for this
thread, so the user gets the stock model or the stock error, never a half-loaded model.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import threading
import time

from fasthug_patch import activation, capabilities, device_move, loadcall, rng_state
from fasthug_patch.errors import DistributedLoadError
from fasthug_patch.report import LOGGER_NAME, LoadReport, publish

logger = logging.getLogger(LOGGER_NAME)

# Stock from_pretrained is not thread-safe: it switches torch's process-wide default dtype
# while it builds the model, so two threads loading at once can get each other's dtype
# (seen with transformers 5.23: bf16 checkpoints coming back partly fp32). While the patch
# is installed, calls through it are serialised; each load still uses every core.
_serialise_loads = threading.RLock()

# Arguments that stock from_pretrained may mutate and a retry must see fresh.
_MUTABLE_KWARGS = ("config", "quantization_config", "device_map", "max_memory")


def make_from_pretrained_wrapper(adapter):
    def from_pretrained_wrapper(wrapped, cls, args, kwargs):
        with _serialise_loads:
            return _route(adapter, wrapped, cls, args, kwargs)

    return from_pretrained_wrapper


def _route(adapter, wrapped, cls, args, kwargs):
    if not activation.is_enabled():
        return wrapped(*args, **kwargs)
    source = str(args[0] if args else kwargs.get("pretrained_model_name_or_path", ""))
    report = LoadReport(model_class=getattr(cls, "__name__", str(cls)), source=source)
    try:
        facts = adapter.call_facts(cls, args, kwargs)
        decision = capabilities.decide(facts, "call")
    except Exception as exc:  # noqa: BLE001 - deciding must never break a load
        decision = capabilities.Decision(False, f"could not inspect the call: {exc!r}", "inspect-error")
    with loadcall.guarding_paths():
        if not decision.fast:
            return _stock(wrapped, args, kwargs, report, decision.reason)
        return _fast(wrapped, args, kwargs, report, cls)


def _stock(wrapped, args, kwargs, report: LoadReport, reason: str):
    report.path, report.reason = "fallback", reason
    began = time.perf_counter()
    try:
        with activation.disabled():
            return wrapped(*args, **kwargs)
    finally:
        report.seconds = time.perf_counter() - began
        publish(report)


@contextlib.contextmanager
def _no_gc_pause():
    """Keep the cyclic garbage collector off while the load runs. After transformers'
    imports a full collection takes 0.17-0.23 s on the reference VM, and the objects a load
    allocates (ours and stock's) may or may not tip one over: measured on 4.57, a 1b load
    took 0.21-0.30 s with one and 0.10 s without. Nothing is lost: whatever cycles the load
    leaves are collected as usual once the call returns (the switch is process-wide, so
    other threads skip collections for that long too)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fast(wrapped, args, kwargs, report: LoadReport, cls=None):
    retry_kwargs = {k: copy.deepcopy(v) for k, v in kwargs.items() if k in _MUTABLE_KWARGS}
    rng = rng_state.snapshot()  # a redo by stock starts from the call's random state
    began = time.perf_counter()
    call = loadcall.LoadCall(report)
    call.device_map = kwargs.get("device_map")
    call.max_memory = kwargs.get("max_memory")
    call.model_class = cls
    call.casting = any(str(kwargs.get(k, "auto")) not in ("auto", "None") for k in ("dtype", "torch_dtype"))
    call.dtype_asked = kwargs.get("dtype", kwargs.get("torch_dtype"))
    failed = True
    try:
        with call, _no_gc_pause():
            result = wrapped(*args, **kwargs)
        failed = False
    except Exception as exc:
        if _from_peers(exc):
            # Another rank failed or timed out: every rank raises, none retries alone.
            report.path, report.reason = "fallback", f"ranks failed: {exc}"
            report.seconds = time.perf_counter() - began
            publish(report)
            raise
        # A checkpoint file whose header the fast path read (cast_ahead reads them before
        # stock opens the files) was replaced or removed since: stock may have failed on
        # that mid-call, so the load is redone by stock on the files as they now are, as
        # for a file changed after the fast path mapped it.
        changed = call.change_seen()
        if not call.entered_fast_internals and changed is None:
            # Raised by stock code before any weight went through the fast path: that
            # is stock's own error, unchanged.
            report.path, report.reason = "fallback", f"stock raised before loading weights: {exc!r}"
            report.seconds = time.perf_counter() - began
            publish(report)
            raise
        why = f"{type(exc).__name__}: {exc}" if changed is None else changed
        logger.warning("fasthug_patch: the fast path failed (%s); loading %s with the stock loader instead",
                       why, report.source)
        call.close(failed=True)
        reason = f"fast path error: {exc!r}" if changed is None else f"{changed} (meanwhile: {exc!r})"
        rng.restore()
        return _stock(wrapped, args, {**kwargs, **retry_kwargs}, report, reason)
    finally:
        call.close(failed=failed)

    report.seconds = time.perf_counter() - began
    if call.fast_loads and not call.stock_loads:
        report.path = "fast"
        device_move.note_fast_loaded(result)
    else:
        report.path = "fallback"
        report.reason = "; ".join(call.stock_loads) or "no weights went through the loader internals"
        if call.fast_loads:
            report.notes.append(f"{call.fast_loads} weight loads took the fast path")
    publish(report)
    return result


def _from_peers(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised because of, a DistributedLoadError (stock code
    between us and the error may wrap it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DistributedLoadError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
