"""Tensors made as stock makes them under ``torch.inference_mode()``.

Serving code often loads inside ``torch.inference_mode()``. The mode is thread-local, and a
tensor made on a thread inside it is an *inference tensor* (``is_inference()``): it has no
version counter and cannot be updated in place outside the mode, so a model of them cannot
be trained. Which weights stock hands out as inference tensors therefore follows the thread
that made them: 4.x makes every tensor on the loading thread (all inference tensors when
it is in the mode); 5.x's loader thread pool makes plain ones, and its synchronous loading
(quantising on the fly, HF_DEACTIVATE_ASYNC_LOAD) inference ones again.

The engine makes every tensor plain (``makes_plain_tensors`` on its entry points; its own
threads are never in the mode), so that its reader threads can write into what it
allocates. Where stock would have made the tensor on the current thread, the adapters hand
it over through ``as_made_here``: the same memory, as an inference tensor exactly when this
thread is in the mode. No byte is copied either way.
"""

from __future__ import annotations

import contextlib
import functools

from fasthug_patch.errors import FastPathError


def plain():
    """Context: tensors made inside are plain ones, even in a caller's inference_mode
    (views of an inference tensor stay inference tensors: ``as_made_here`` mends those)."""
    import torch

    if not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()  # the common case: no mode object per call
    return torch.inference_mode(False)


def makes_plain_tensors(method):
    """Decorates the engine's entry points: every tensor they make (and the mappings whose
    views they hand out) is plain, whatever mode the calling thread is in."""

    @functools.wraps(method)
    def entry(*args, **kwargs):
        with plain():
            return method(*args, **kwargs)

    return entry


def as_made_here(tensor):
    """``tensor`` as stock's tensor would be had stock made it on this thread now: an
    inference tensor inside torch.inference_mode(), a plain one outside it; an alias of the
    same memory where ``tensor`` is of the other kind."""
    import torch

    wanted = torch.is_inference_mode_enabled()
    if not isinstance(tensor, torch.Tensor) or tensor.is_inference() == wanted:
        return tensor
    if type(tensor) is not torch.Tensor:  # an alias would drop the subclass: let stock load it
        raise FastPathError(f"a {type(tensor).__name__} is not handed over as an inference tensor")
    with torch.inference_mode(wanted):
        # set_ on a new empty tensor of the wanted kind: same storage, offset, shape and
        # strides; the storage (and an mmap behind it) lives as long as either tensor.
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
