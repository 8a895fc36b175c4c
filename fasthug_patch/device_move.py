"""model.cuda() / model.to("cuda") for a model the fast path loaded to CPU.

Such a model's weights are views of memory-mapped checkpoint files. torch would move them
one tensor at a time from pageable memory, faulting the pages in on one thread. Here every
tensor is streamed through the pinned staging ring by the reader threads first (all of them
finished before anything changes), and then the model's own ``Module._apply`` swaps them in
exactly as torch's ``to`` would, so parameter objects, ``requires_grad``, tied parameters
(one Parameter object shared by two modules) and hooks behave as stock. Anything this does
not cover, or any error before the swap, goes to the stock method unchanged.
"""

from __future__ import annotations

import logging
import time
import weakref

from fasthug_patch import activation, settings
from fasthug_patch.report import LOGGER_NAME
from fasthug_patch.thread_modes import as_made_here, user_torch_modes

logger = logging.getLogger(LOGGER_NAME)

# Models whose weights the fast path loaded (weakly held: the set never keeps one alive).
_fast_loaded: weakref.WeakSet = weakref.WeakSet()
# Moves streamed through the ring so far, and what the last one did (tests, bench).
moves_streamed = 0
last_move: dict = {}


def note_fast_loaded(result) -> None:
    """Remember the model from_pretrained returned (alone, or first of a tuple)."""
    model = result[0] if isinstance(result, tuple) and result else result
    try:
        _fast_loaded.add(model)
    except TypeError:
        pass


def was_fast_loaded(model) -> bool:
    return model in _fast_loaded


def cuda_wrapper(wrapped, instance, args, kwargs):
    """Wraps PreTrainedModel.cuda(device=None)."""
    device = _cuda_target(args, kwargs) if _eligible(instance) else None
    if device is None or not _stream(instance, device, lambda t: t.cuda(device)):
        return wrapped(*args, **kwargs)
    return instance


def to_wrapper(wrapped, instance, args, kwargs):
    """Wraps PreTrainedModel.to(...): only a move to a CUDA device with no dtype streams."""
    device = _to_target(args, kwargs) if _eligible(instance) else None
    if device is None or not _stream(instance, device, lambda t: t.to(device)):
        return wrapped(*args, **kwargs)
    return instance


def _eligible(model) -> bool:
    return (
        model is not None
        and activation.is_enabled()
        and settings.stream_model_moves()
        and was_fast_loaded(model)
        and not getattr(model, "is_quantized", False)
        and getattr(model, "hf_quantizer", None) is None
        and not user_torch_modes()  # torch's move runs its copies under them; the ring's would not
    )


def _cuda_target(args, kwargs):
    import torch

    if len(args) > 1 or set(kwargs) - {"device"}:
        return None
    device = args[0] if args else kwargs.get("device")
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return device if device.type == "cuda" else None


def _to_target(args, kwargs):
    import torch

    try:
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    except Exception:  # noqa: BLE001 - let stock raise its own error
        return None
    if device is None or device.type != "cuda" or dtype is not None or memory_format is not None:
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return device


def _stream(model, device, stock_convert, engine_factory=None) -> bool:
    """Move ``model`` to ``device`` through the ring. False (nothing changed) if it could
    not, so the caller runs the stock method."""
    import torch

    if torch.__future__.get_overwrite_module_params_on_conversion() or \
            torch.__future__.get_swap_module_params_on_conversion():
        return False  # torch then builds new Parameter objects per module: leave that to torch
    global moves_streamed, last_move
    began = time.perf_counter()
    tensors = _cpu_tensors(model)
    try:
        moved = stream_tensors(tensors, device, engine_factory)
    except Exception as exc:  # noqa: BLE001 - nothing was changed yet
        logger.warning("fasthug_patch: streaming %s to %s failed (%s: %s); using torch's own move",
                       type(model).__name__, device, type(exc).__name__, exc)
        return False

    def convert(t):
        if t.device.type == "cpu":
            ready = moved.get(id(t))
            if ready is not None and ready[0] is t:
                return as_made_here(ready[1])  # as t.to(device) makes it on this thread
        return stock_convert(t)

    with torch.no_grad():
        model._apply(convert)
    moves_streamed += 1
    last_move = {"tensors": len(moved), "bytes": sum(t.numel() * t.element_size() for t in tensors),
                 "seconds": time.perf_counter() - began, "device": str(device)}
    logger.info("fasthug_patch: %s moved to %s through the pinned ring: %d tensors, %.2f GB in %.3fs",
                type(model).__name__, device, len(moved), last_move["bytes"] / 1e9, last_move["seconds"])
    return True


def _cpu_tensors(model) -> list:
    """Each distinct parameter and buffer object on the CPU that the ring can copy whole."""
    import torch

    seen, out = set(), []
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.layout == torch.strided:
            out.append(tensor)
    return out


def stream_tensors(tensors, device, engine_factory=None) -> dict:
    """id(tensor) -> (tensor, its copy on ``device``), all copies finished."""
    engine = (engine_factory or _default_engine)()
    failed = True
    try:
        futures = [(t, engine.submit(t.detach(), None, device)) for t in tensors]
        moved = {id(t): (t, future.result()) for t, future in futures}
        failed = False
        return moved
    finally:
        engine.close(cancel=failed)


def _default_engine():
    from fasthug_patch.engine import Materializer

    return Materializer(settings.reader_threads(), settings.chunk_bytes(), None)
